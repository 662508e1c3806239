"""The `tailrace` command: run a workflow batch, run the bundled demo, serve the simulator, show the
cluster budget (`tailrace budget status`), predict or tune a policy from a trace (`tailrace whatif`, `tune`).

Bad input (missing file, malformed JSONL line, invalid spec) ends in one clear paragraph on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tailrace.engine.errors import SpecError, TailraceError
from tailrace.engine.specs import RunOptions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO_WORKFLOW = EXAMPLES / "support_triage" / "workflow.yaml"
DEMO_INPUTS = EXAMPLES / "support_triage" / "inputs.jsonl"

SCENARIO_NAMES = ("clean", "heavy-tail", "brownout", "tpm")
console = Console(stderr=False)
errors = Console(stderr=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailrace", description="Valid LLM workflow results, on time.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a batch of input records through a workflow")
    run.add_argument("workflow", help="workflow spec (.yaml or .json)")
    run.add_argument("--inputs", required=True, help="input records, one JSON object per line")
    _run_options(run)

    demo = sub.add_parser("demo", help="run the bundled example workflow on its bundled inputs")
    _run_options(demo)

    sim = sub.add_parser("sim", help="serve the provider simulator (OpenAI and Anthropic wire formats)")
    sim.add_argument("--scenario", default="clean", choices=SCENARIO_NAMES)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--time-scale", type=float, default=1.0, help="multiply simulated durations")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--log", help="JSONL request log")

    from tailrace.cluster import cli_ops

    cli_ops.add_commands(sub, SCENARIO_NAMES)  # submit, status, logs, results, stop, report, replay
    from tailrace.cluster import cli_whatif

    cli_whatif.add_commands(sub)  # whatif, tune
    budget = sub.add_parser("budget", help="the cluster budget: tenants' spend, rate buckets")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    status = budget_sub.add_parser("status", help="today's spend per tenant and each bucket's state")
    status.add_argument("--address", help="Ray cluster address (default: the local cluster)")
    status.add_argument("--name", default="tailrace-budget", help="budget actor name")
    status.add_argument("--redis-url", help="read the ledger from Redis directly (default: $TAILRACE_REDIS_URL)")
    status.add_argument("--namespace", default="default", help="ledger namespace in Redis")
    status.add_argument("--day", help="UTC day, YYYY-MM-DD (default: today)")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deadline", type=float, help="end-to-end deadline per run, seconds")
    p.add_argument("--max-cost", type=float, help="cost cap per run, USD")
    p.add_argument("--tenant", help="tenant name")
    p.add_argument("--address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--out", help="results JSONL (default: results-<workflow>.jsonl)")
    p.add_argument("--executors", type=int, default=2, help="step executor actors")
    p.add_argument("--concurrency", type=int, default=64, help="runs in flight at once")
    p.add_argument(
        "--scenario", choices=SCENARIO_NAMES, help="use the built-in simulator with this scenario, even if keys are set"
    )
    p.add_argument("--seed", type=int, default=0, help="simulator seed")
    p.add_argument("--time-scale", type=float, default=1.0, help="simulator time scale")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "sim":
            return _serve_simulator(args)
        from tailrace.cluster import cli_ops

        if args.command in cli_ops.COMMANDS:
            return cli_ops.run(args)
        from tailrace.cluster import cli_whatif

        if args.command in cli_whatif.COMMANDS:
            return cli_whatif.run(args)
        if args.command == "budget":
            return _budget_status(args)
        if args.command == "demo":
            args.workflow, args.inputs = str(DEMO_WORKFLOW), str(DEMO_INPUTS)
        return _run(args)
    except TailraceError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        errors.print("interrupted: finished runs are in the results file; run again to resume")
        return 130


def _budget_status(args: argparse.Namespace) -> int:
    import json
    import os

    from tailrace.cluster.budget import bucket_rows, budget_status, spend_rows
    from tailrace.policies.budget_config import redact_url

    redis_url = args.redis_url or os.environ.get("TAILRACE_REDIS_URL")
    try:
        status = budget_status(
            address=args.address, name=args.name, redis_url=redis_url, namespace=args.namespace, day=args.day
        )
    except LookupError as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except Exception as exc:  # never echo a URL with its password
        where = redact_url(redis_url) if redis_url else "the cluster"
        errors.print(
            f"[bold red]error:[/] cannot read the budget from {escape(where)} ({type(exc).__name__})", highlight=False
        )
        return 2
    if args.json:
        console.print_json(
            json.dumps(
                {
                    "day": status.day,
                    "backend": status.backend,
                    "leases": status.leases,
                    "spend": spend_rows(status),
                    "buckets": bucket_rows(status),
                },
                default=str,
            )
        )
        return 0
    spend = Table(title=f"spend on {status.day} (UTC), ledger: {status.backend}")
    for column in ("tenant", "cost $", "input tokens", "output tokens", "attempts", "cancelled", "wasted tokens"):
        spend.add_column(column, justify="right")
    for row in spend_rows(status):
        spend.add_row(
            escape(row["tenant"]),
            f"{row['usd']:.6f}",
            f"{row['input_tokens']:,}",
            f"{row['output_tokens']:,}",
            f"{row['attempts']:,}",
            f"{row['cancelled']:,}",
            f"{row['wasted_tokens']:,}",
        )
    console.print(spend)
    buckets = Table(title=f"buckets ({status.leases} live leases)")
    for column in ("bucket", "limit", "per minute", "free", "leased", "used %"):
        buckets.add_column(column, justify="right")
    for row in bucket_rows(status):
        per_min = "-" if row["per_minute"] != row["per_minute"] else f"{row['per_minute']:,.0f}"
        buckets.add_row(
            escape(row["bucket"]),
            f"{row['capacity']:,.4g}",
            per_min,
            f"{row['free']:,.4g}",
            f"{row['leased']:,.4g}",
            f"{100 * row['utilisation']:.0f}",
        )
    console.print(buckets)
    return 0


def _serve_simulator(args: argparse.Namespace) -> int:
    from tailrace.engine.sim import run_forever, scenario

    config = scenario(args.scenario, seed=args.seed, time_scale=args.time_scale)
    console.print(
        f"simulator: scenario {args.scenario!r}, seed {args.seed}, on http://{args.host}:{args.port} "
        f"(OpenAI base URL http://{args.host}:{args.port}/v1)"
    )
    run_forever(config, args.host, args.port, args.log)
    return 0


@contextlib.contextmanager
def _endpoints(workflow, args: argparse.Namespace) -> Iterator[object]:  # type: ignore[no-untyped-def]
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


def _run(args: argparse.Namespace) -> int:
    from tailrace.cluster.api import run_batch
    from tailrace.engine.loading import check_inputs, load_inputs, load_workflow

    workflow = load_workflow(args.workflow)
    if not Path(args.inputs).is_file():
        from tailrace.engine.errors import InputError

        raise InputError(f"inputs file {args.inputs!r} does not exist")
    options = _options(workflow.defaults, args)
    out = args.out or f"results-{workflow.name}.jsonl"
    total = 0
    for line, record in load_inputs(args.inputs):  # every record checked before anything starts
        check_inputs(workflow, record, line, source=args.inputs)
        total += 1
    with _endpoints(workflow, args) as simulator, _progress() as progress:
        task = progress.add_task(workflow.name, total=total)
        summary = run_batch(
            workflow,
            args.inputs,
            options=options,
            out=out,
            address=args.address,
            simulator=simulator,  # type: ignore[arg-type]
            num_executors=args.executors,
            max_in_flight=args.concurrency,
            on_done=lambda _: progress.advance(task),
        )
    console.print(summary_table(summary, workflow.name, options.deadline_s))
    from tailrace.cluster.trace import default_trace_path

    console.print(f"results: {out}   trace: {default_trace_path(out)}   tail report: tailrace report {out}")
    return 0 if summary.delivered == summary.runs else 1


def _options(defaults: RunOptions, args: argparse.Namespace) -> RunOptions:
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


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def summary_table(summary, workflow: str, deadline_s: float) -> Table:  # type: ignore[no-untyped-def]
    p = summary.percentiles()
    table = Table(title=f"{workflow}: {summary.runs} runs, deadline {deadline_s:g} s, latency in s")
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


if __name__ == "__main__":
    sys.exit(main())
