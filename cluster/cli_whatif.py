"""The `tailrace whatif` and `tailrace tune` subcommands: predict a policy from a trace, and search for the
cheapest one that meets a target. Both replay the trace on fake time in this process; no cluster.

    tailrace whatif results.jsonl --hedge ttft_quantile=0.8 --deadline 12 [--ladder claude-haiku-4-5,gpt-4.1]
    tailrace tune results.jsonl --target-hit 0.999 --max-extra-tokens 0.08
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from typing import Any

import pydantic
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tailrace.engine.errors import SpecError

COMMANDS = ("whatif", "tune")
console = Console(stderr=False)
errors = Console(stderr=True)

_ROWS = (
    ("hit rate", "hit_rate", "pct"),
    ("p50 s", "p50", "s"),
    ("p90 s", "p90", "s"),
    ("p99 s", "p99", "s"),
    ("p99.9 s", "p999", "s"),
    ("extra tokens", "extra_tokens", "pct"),
    ("cost $ / delivered run", "cost_per_delivered_usd", "usd"),
    ("429s", "rate_limited", "count"),
    ("refused by the budget", "refused", "count"),
)


def add_commands(sub: Any) -> None:
    whatif = sub.add_parser("whatif", help="predict a policy's hit rate, latency tail and cost from a trace")
    _trace_args(whatif)
    _change_args(whatif)
    tune = sub.add_parser("tune", help="find the cheapest tail control that meets a hit-rate target, from a trace")
    _trace_args(tune)
    tune.add_argument("--target-hit", type=float, required=True, help="hit rate to meet, e.g. 0.999")
    tune.add_argument(
        "--max-extra-tokens", type=float, required=True, help="tokens beyond the answers used, e.g. 0.08 for 8%%"
    )
    tune.add_argument("--screen-runs", type=int, help="runs per candidate while screening (default: min(runs, 500))")
    _change_args(tune, hedge=False)


def register(sub: Any) -> dict[str, Any]:
    """The `whatif` and `tune` parsers; their handler (see `tailrace.cluster.cli`)."""
    add_commands(sub)
    return {name: run for name in COMMANDS}


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="a trace written by `tailrace run` (results.trace.jsonl, or the results file)")
    p.add_argument("--runs", type=int, help="runs per replay (default: as many as the trace has)")
    p.add_argument("--replays", type=int, default=5, help="replays, for the 95%% intervals (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="replays at once, each in a process (0: one per CPU)")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module first (one that registers the workflow's custom validators); repeatable",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _change_args(p: argparse.ArgumentParser, hedge: bool = True) -> None:
    p.add_argument("--deadline", type=float, help="end-to-end deadline per run, seconds")
    if hedge:
        p.add_argument(
            "--hedge",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="a HedgeConfig setting, e.g. ttft_quantile=0.8 or enabled=false (repeatable)",
        )
        p.add_argument(
            "--ladder",
            action="append",
            default=[],
            metavar="[STEP=]MODEL,MODEL",
            help="a ladder order (every step, or STEP's), strongest first; repeatable",
        )
    p.add_argument("--tpm", type=int, help="a cluster budget: tokens per minute for each provider account")
    p.add_argument("--max-cost", type=float, help="cost cap per run, USD")
    p.add_argument("--concurrency", type=int, help="runs in flight at once (default: as in the trace)")


def run(args: argparse.Namespace) -> int:
    for module in args.imports:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any failure of user code at import means "cannot use it"
            raise SpecError("--import", f"cannot import {module!r}: {type(exc).__name__}: {exc}") from None
    change = _change(args)
    if args.command == "whatif":
        from tailrace.cluster.whatif import what_if

        prediction = what_if(args.trace, change, runs=args.runs, replays=args.replays, seed=args.seed, jobs=args.jobs)
        if args.json:
            console.print_json(prediction.model_dump_json(exclude={"samples"}))
        else:
            _print_prediction(prediction)
        return 0
    from tailrace.cluster.whatif import tune

    result = tune(
        args.trace,
        target_hit=args.target_hit,
        max_extra_tokens=args.max_extra_tokens,
        base=change,
        runs=args.runs,
        screen_runs=args.screen_runs,
        replays=args.replays,
        seed=args.seed,
        jobs=args.jobs,
    )
    if args.json:
        chosen = result.best or result.nearest
        console.print_json(
            json.dumps(
                {
                    "met": result.met,
                    "change": chosen.change.model_dump(mode="json"),
                    "yaml": result.config_yaml(),
                    "python": result.config_python(),
                    "predicted": {k: v.model_dump() for k, v in result.estimates().items()},
                    "tried": len(result.tried),
                    "warnings": result.warnings,
                },
                default=str,
            )
        )
    else:
        _print_tune(result)
    return 0 if result.met else 1


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def _change(args: argparse.Namespace) -> Any:
    from tailrace.whatif.change import ALL_STEPS, WhatIf

    fields: dict[str, Any] = {
        "deadline_s": args.deadline,
        "tpm": args.tpm,
        "max_cost_usd": args.max_cost,
        "concurrency": args.concurrency,
    }
    hedge: dict[str, Any] = {}
    for item in getattr(args, "hedge", []):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SpecError("--hedge", f"{item!r}: expected FIELD=VALUE, e.g. ttft_quantile=0.8")
        hedge[name.strip()] = _value(value)
    ladder: dict[str, list[str]] = {}
    for item in getattr(args, "ladder", []):
        step, sep, models = item.rpartition("=")
        names = [m.strip() for m in models.split(",") if m.strip()]
        if not names:
            raise SpecError("--ladder", f"{item!r}: expected [STEP=]MODEL,MODEL,...")
        ladder[step.strip() if sep else ALL_STEPS] = names
    try:
        return WhatIf(**{k: v for k, v in fields.items() if v is not None}, hedge=hedge, ladder=ladder)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        flag = {"deadline_s": "--deadline", "tpm": "--tpm", "max_cost_usd": "--max-cost"}.get(
            str(first["loc"][0]), f"--{first['loc'][0]}"
        )
        message = first["msg"].removeprefix("Value error, ")
        raise SpecError(flag, message) from None


def _fmt(value: float, kind: str) -> str:
    if not math.isfinite(value):
        return "-" if math.isnan(value) else "inf"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "s":
        return f"{value:.3f}"
    if kind == "usd":
        return f"{value:.6f}"
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def _prediction_table(title: str, recorded: Any, predicted: Any, replays: int) -> Table:
    table = Table(title=title)
    for column in ("", "trace (recorded)", "predicted", f"95% interval ({replays} replays)"):
        table.add_column(column, justify="right")
    for label, name, kind in _ROWS:
        e = predicted[name]
        table.add_row(
            label,
            _fmt(recorded.value(name), kind),
            _fmt(e.mean, kind),
            f"{_fmt(e.low, kind)} - {_fmt(e.high, kind)}",
        )
    return table


def _print_prediction(p: Any) -> None:
    title = f"what if: {p.change} ({p.runs} runs per replay)"
    console.print(_prediction_table(title, p.recorded, p.predicted, p.replays))
    console.print(
        f"trace: {escape(p.trace)} ({p.recorded.runs} runs); replayed at {p.runs_per_cpu_s:,.0f} runs per CPU second"
    )
    for warning in p.warnings:
        console.print(f"[yellow]note:[/] {escape(warning)}", highlight=False)


def _print_tune(result: Any) -> None:
    chosen = result.best or result.nearest
    targets = f"hit rate >= {result.target_hit:.3%}, extra tokens <= {result.max_extra_tokens:.1%}"
    verdict = (
        f"[green]meets the targets[/] ({targets})"
        if result.met
        else f"[red]no policy tried meets the targets[/] ({targets}); the nearest:"
    )
    console.print(f"tried {len(result.tried)} policies; {verdict}")
    console.print(
        _prediction_table(
            f"tuned: {chosen.change.describe()}", result.recorded, result.estimates(), chosen.prediction.replays
        )
    )
    console.print("paste into the workflow:")
    console.print(escape(result.config_yaml()), highlight=False)
    console.print("or from Python:")
    console.print(escape(result.config_python()), highlight=False)
    for warning in result.warnings:
        console.print(f"[yellow]note:[/] {escape(warning)}", highlight=False)


__all__ = ["COMMANDS", "add_commands", "run"]
