"""What every `tailrace` subcommand shares: the consoles, strict argument parsing, run options from
flags, the built-in simulator when asked for (or when nothing is configured), progress bars and the
summary table.

Exit statuses, the same for every command: 0 done (for `run`/`demo`: every run delivered), 1 done
but not everything went well (`run`/`demo`: some run was not delivered; `status`: the job failed),
2 bad input or a setup that cannot work (one clear message, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tailrace.engine.errors import SpecError
from tailrace.engine.sim.config import SCENARIOS
from tailrace.engine.specs import RunOptions, WorkflowSpec

SCENARIO_NAMES = tuple(SCENARIOS)
EXIT_OK, EXIT_NOT_ALL_DELIVERED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
console = Console(stderr=False)
errors = Console(stderr=True)


class StrictParser(argparse.ArgumentParser):
    """No prefix matching: a misspelled flag (`--deadlin`) is an error, never a guess. Subcommands'
    parsers are of this class too (argparse creates them with the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def error(message: str) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


_said: set[str] = set()


def note(message: str) -> None:
    """A remark in yellow, said once (the library may say the same thing again on its logger)."""
    if message not in _said:
        _said.add(message)
        console.print(f"[yellow]{escape(message)}[/]", highlight=False)


@contextlib.contextmanager
def library_notes() -> Iterator[None]:
    """What the library says on the `tailrace` logger (resumed runs, the simulator, ...) shows as notes."""

    class ToConsole(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            note(record.getMessage().removeprefix("tailrace: "))

    logger = logging.getLogger("tailrace")
    handler = ToConsole(logging.WARNING)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deadline", type=float, help="end-to-end deadline per run, seconds")
    p.add_argument("--max-cost", type=float, help="cost cap per run, USD")
    p.add_argument("--tenant", help="tenant name")


def add_simulator_options(p: argparse.ArgumentParser, what: str = "use the built-in simulator") -> None:
    p.add_argument("--scenario", choices=SCENARIO_NAMES, help=f"{what} with this scenario, even if keys are set")
    p.add_argument("--seed", type=int, default=0, help="simulator seed")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulator time scale")


def run_options(defaults: RunOptions, args: argparse.Namespace) -> RunOptions:
    flags = {
        "deadline_s": ("--deadline", args.deadline),
        "max_cost_usd": ("--max-cost", args.max_cost),
        "tenant": ("--tenant", args.tenant),
    }
    overrides = {field: value for field, (_, value) in flags.items() if value is not None}
    try:
        return RunOptions(**{**defaults.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{flags[str(e['loc'][0])][0]}: {e['msg']}" for e in exc.errors())
        raise SpecError("run options", problems) from None


@contextlib.contextmanager
def simulator_for(workflow: WorkflowSpec, args: argparse.Namespace) -> Iterator[Any]:
    """The built-in simulator's endpoints when `--scenario` asks for it or no provider is configured
    (started here, stopped on exit, and said so); else None."""
    from tailrace.cluster.providers import SimulatorEndpoints, needs_simulator

    if args.scenario is None and not needs_simulator(workflow):
        yield None
        return
    from tailrace.engine.sim import SimServer, scenario

    name = args.scenario or "clean"
    with SimServer.in_thread(scenario(name, seed=args.seed, time_scale=args.time_scale)) as sim:
        why = "as asked" if args.scenario else "no API keys or provider URLs are configured"
        console.print(
            f"[yellow]Using the built-in provider simulator[/] ({why}): scenario {name!r}, "
            f"seed {args.seed}, at {sim.openai_base_url.rsplit('/', 1)[0]}"
        )
        yield SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def summary_table(summary: Any, workflow: str, deadline_s: float, title: str | None = None) -> Table:
    p = summary.percentiles()
    table = Table(title=title or f"{workflow}: {summary.runs} runs, deadline {deadline_s:g} s, latency in s")
    for column in ("runs", "delivered", "hit rate", "p50", "p90", "p99", "max", "tokens", "cost $"):
        table.add_column(column, justify="right")
    table.add_row(
        str(summary.runs),
        str(summary.delivered),
        f"{summary.hit_rate:.1%}",
        *(f"{p[k]:.2f}" for k in ("p50", "p90", "p99", "max")),
        f"{summary.input_tokens + summary.output_tokens:,}",
        f"{summary.cost_usd:.4f}",
    )
    if summary.failures:
        table.caption = "failures: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.failures.items()))
    return table
