"""The `tailrace` subcommands for living with a cluster: submit, status, logs, results, stop (batches
as Ray jobs), report (the tail report and its plot) and replay (behaviour rates of one request)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from tailrace.engine.errors import InputError

COMMANDS = ("submit", "status", "logs", "results", "stop", "report", "replay")
console = Console(stderr=False)


def add_commands(sub: Any, scenario_names: tuple[str, ...]) -> None:
    submit = sub.add_parser("submit", help="submit a batch to a Ray cluster as a job (idempotent)")
    submit.add_argument("workflow", help="workflow spec (.yaml or .json)")
    submit.add_argument("--inputs", required=True, help="input records, one JSON object per line")
    _address(submit)
    submit.add_argument("--id", dest="submission_id", help="submission id (default: derived from the batch)")
    submit.add_argument("--working-dir", help="shipped to the cluster (default: the workflow's directory)")
    submit.add_argument("--pip", action="append", default=[], help="a pip requirement for the job (repeatable)")
    submit.add_argument(
        "--no-ship-tailrace", action="store_true", help="the cluster has tailrace installed: do not ship its packages"
    )
    submit.add_argument("--python", default="python", help="the cluster's Python interpreter (default: python)")
    submit.add_argument("--results-dir", default=None, help="on the head node (default: ~/.tailrace/jobs)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    submit.add_argument("--deadline", type=float, help="end-to-end deadline per run, seconds")
    submit.add_argument("--max-cost", type=float, help="cost cap per run, USD")
    submit.add_argument("--tenant", help="tenant name")
    submit.add_argument("--concurrency", type=int, default=64, help="runs in flight at once")
    submit.add_argument("--scenario", choices=scenario_names, help="run against the built-in simulator")
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--time-scale", type=float, default=1.0)
    submit.add_argument("--min-executors", type=int, default=1)
    submit.add_argument("--max-executors", type=int, default=8)
    submit.add_argument("--target-in-flight", type=int, default=32, help="steps per executor before growing")
    submit.add_argument("--executor-cpus", type=float, default=0.5, help="logical CPUs per executor")
    submit.add_argument(
        "--executor-resource",
        action="append",
        default=[],
        metavar="NAME=N",
        help="a custom logical resource per executor, e.g. tailrace_executor=1 (repeatable)",
    )
    submit.add_argument("--redact-prompts", action="store_true", help="keep prompt text out of the trace")

    for name, text in (
        ("status", "show a submitted batch's state and progress"),
        ("logs", "print a submitted batch's logs"),
        ("stop", "stop a submitted batch"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("submission_id")
        _address(p)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true")
        if name == "status":
            p.add_argument("--json", action="store_true")

    results = sub.add_parser("results", help="fetch a submitted batch's results (and trace) to this machine")
    results.add_argument("submission_id")
    _address(results)
    results.add_argument("--results-dir", default=None, help="where the job wrote them on the head node")
    results.add_argument("--out", help="local results file (default: results-<id>.jsonl)")
    results.add_argument("--python", default="python", help="the cluster's Python interpreter")
    results.add_argument("--via-job", action="store_true", help="always fetch through a helper job")

    report = sub.add_parser("report", help="the tail report of a results file, with a latency CDF plot")
    report.add_argument("results", help="results JSONL")
    report.add_argument("--trace", help="its trace (default: <results>.trace.jsonl if present; gives the DAG)")
    report.add_argument("--workflow", help="the workflow spec, for the exact critical path")
    report.add_argument("--plot", help="PNG path (default: <results>.cdf.png)")
    report.add_argument("--no-plot", action="store_true")
    report.add_argument("--slowest", type=int, default=5)
    report.add_argument("--json", action="store_true")

    replay = sub.add_parser("replay", help="re-send one recorded request N times and report outcome rates")
    replay.add_argument("trace", help="trace JSONL (<results>.trace.jsonl)")
    replay.add_argument("--step", required=True)
    replay.add_argument("--run", help="the run whose attempt to replay (default: the first recorded)")
    replay.add_argument("--attempt", type=int, help="attempt number within the step (default: the first)")
    replay.add_argument("--n", type=int, default=100)
    replay.add_argument("--concurrency", type=int, default=8)
    replay.add_argument("--max-cost", type=float, default=1.0, help="refuse if the worst case costs more, USD")
    replay.add_argument("--scenario", choices=scenario_names, help="replay against the built-in simulator")
    replay.add_argument("--seed", type=int, default=0)
    replay.add_argument("--time-scale", type=float, default=1.0)
    replay.add_argument("--json", action="store_true")


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS or "
        "http://127.0.0.1:8265); Ray's auth token is sent when configured",
    )


def run(args: argparse.Namespace) -> int:
    return {
        "submit": _submit,
        "status": _status,
        "logs": _logs,
        "results": _results,
        "stop": _stop,
        "report": _report,
        "replay": _replay,
    }[args.command](args)


def _submit(args: argparse.Namespace) -> int:
    from tailrace.cluster import jobs
    from tailrace.cluster.cli import _options
    from tailrace.cluster.pool import PoolConfig
    from tailrace.engine.loading import check_inputs, load_inputs, load_workflow

    workflow = load_workflow(args.workflow)
    if not Path(args.inputs).is_file():
        raise InputError(f"inputs file {args.inputs!r} does not exist")
    for line, record in load_inputs(args.inputs):  # every record checked before anything is sent
        check_inputs(workflow, record, line, source=args.inputs)
    options = _options(workflow.defaults, args)
    overrides = options.model_dump()
    resources = {}
    for item in args.executor_resource:
        name, _, value = item.partition("=")
        try:
            resources[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--executor-resource {item!r}: expected NAME=NUMBER") from None
    pool = PoolConfig(
        min_executors=args.min_executors,
        max_executors=args.max_executors,
        target_in_flight=args.target_in_flight,
        executor_num_cpus=args.executor_cpus,
        executor_resources=resources,
    )
    batch = jobs.BatchArgs(
        "",
        "",
        overrides,
        concurrency=args.concurrency,
        scenario=args.scenario,
        seed=args.seed,
        time_scale=args.time_scale,
        pool=pool.model_dump(),
        redact_prompts=args.redact_prompts,
    )
    submission = jobs.submit(
        args.workflow,
        args.inputs,
        batch,
        address=args.address,
        submission_id=args.submission_id,
        working_dir=args.working_dir,
        python=args.python,
        pip=args.pip,
        ship_tailrace=not args.no_ship_tailrace,
        results_dir=args.results_dir or jobs.DEFAULT_RESULTS_DIR,
    )
    verb = {
        "submitted": "submitted",
        "resubmitted": "submitted again (finished runs are skipped)",
        "already_running": "already running; not submitted twice",
    }[submission.action]
    console.print(f"{submission.submission_id}: {verb}")
    console.print(
        f"follow it: tailrace status {submission.submission_id}   tailrace logs "
        f"{submission.submission_id} -f   tailrace results {submission.submission_id}"
    )
    if args.wait:
        final = jobs.wait(submission.submission_id, args.address)
        console.print(f"{submission.submission_id}: {final}")
        if final != "SUCCEEDED":
            tail = next(jobs.logs(submission.submission_id, args.address)).rstrip().splitlines()[-15:]
            console.print("last lines of its logs:\n" + "\n".join(tail), markup=False, highlight=False)
        return 0 if final == "SUCCEEDED" else 1
    return 0


def _status(args: argparse.Namespace) -> int:
    from tailrace.cluster import jobs

    state = jobs.status(args.submission_id, args.address)
    if args.json:
        console.print_json(json.dumps(state.as_dict()))
        return 0
    console.print(f"{state.submission_id}: [bold]{state.status}[/]" + (f" ({state.message})" if state.message else ""))
    if state.attempts > 1:
        console.print(f"attempt {state.attempts} (Ray job {state.job_id})")
    if state.progress:
        console.print(f"progress: {state.progress}")
    if state.summary:
        s = state.summary
        console.print(
            f"summary: {s['runs']} runs, {s['delivered']} delivered, {s['on_time']} on time, cost ${s['cost_usd']:.4f}"
        )
    return 0


def _logs(args: argparse.Namespace) -> int:
    from tailrace.cluster import jobs

    for chunk in jobs.logs(args.submission_id, args.address, follow=args.follow):
        sys.stdout.write(chunk)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from tailrace.cluster import jobs

    stopped = jobs.stop(args.submission_id, args.address)
    console.print(
        f"{args.submission_id}: {'stopping' if stopped else 'not running'}; finished runs are kept, "
        "submit it again to resume"
    )
    return 0


def _results(args: argparse.Namespace) -> int:
    from tailrace.cluster import jobs
    from tailrace.cluster.cli import summary_table
    from tailrace.cluster.report import read_results
    from tailrace.cluster.results import BatchSummary
    from tailrace.cluster.trace import default_trace_path

    out = Path(args.out or f"results-{args.submission_id}.jsonl")
    common = {
        "address": args.address,
        "results_dir": args.results_dir or jobs.DEFAULT_RESULTS_DIR,
        "python": args.python,
        "via_job": True if args.via_job else None,
    }
    jobs.fetch_results(args.submission_id, out, **common)
    trace = default_trace_path(out)
    try:
        jobs.fetch_results(args.submission_id, trace, what="trace", **common)
    except jobs.JobError:
        trace = None  # type: ignore[assignment]
    summary = BatchSummary()
    deadlines = []
    for outcome in read_results(out):
        summary.add(outcome)
        deadlines.append(outcome.deadline_at - outcome.started_at)
    name = next(iter(read_results(out))).workflow if summary.runs else args.submission_id
    console.print(summary_table(summary, name, sorted(deadlines)[len(deadlines) // 2] if deadlines else 0))
    console.print(f"results: {out}" + (f"   trace: {trace}" if trace else "") + f"   report: tailrace report {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tailrace.cluster.report import PLOT_INSTALL_HINT, build_report, plot_cdf, read_results, render, report_json
    from tailrace.cluster.trace import default_trace_path, read_trace
    from tailrace.engine.loading import load_workflow
    from tailrace.engine.specs import WorkflowSpec

    results = Path(args.results)
    if not results.is_file():
        raise InputError(f"results file {args.results!r} does not exist")
    workflow = load_workflow(args.workflow) if args.workflow else None
    trace = Path(args.trace) if args.trace else default_trace_path(results)
    if workflow is None and trace.is_file():
        header = next((line for line in read_trace(trace) if line.get("kind") == "batch"), None)
        if header is not None:
            workflow = WorkflowSpec.model_validate(header["workflow"])
    report = build_report(read_results(results), workflow, slowest=args.slowest)
    if report.runs == 0:
        raise InputError(f"results file {args.results!r} holds no runs")
    plot = None
    if not args.no_plot:
        target = Path(args.plot) if args.plot else results.with_name(results.name.removesuffix(".jsonl") + ".cdf.png")
        try:
            plot = plot_cdf(report, target)
        except RuntimeError:
            console.print(f"[yellow]no plot:[/] {escape(PLOT_INSTALL_HINT)}")
    if args.json:
        console.print_json(json.dumps({**report_json(report), "plot": str(plot) if plot else None}))
        return 0
    for renderable in render(report):
        console.print(renderable)
    if plot is not None:
        console.print(f"latency CDF: {plot}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from tailrace.cluster.cli import _endpoints
    from tailrace.cluster.providers import resolve_providers
    from tailrace.cluster.replay import load_target, render, run_replay, worst_case_cost_usd

    if not Path(args.trace).is_file():
        raise InputError(f"trace file {args.trace!r} does not exist")
    if args.n < 1:
        raise InputError("--n must be at least 1")
    target = load_target(args.trace, args.step, args.run, args.attempt)
    with _endpoints(target.workflow, args) as simulator:
        worst = worst_case_cost_usd(target, args.n)
        if simulator is None and worst > args.max_cost:
            raise InputError(
                f"replaying {args.n} times may cost up to ${worst:.2f}, over --max-cost "
                f"${args.max_cost:.2f}; raise --max-cost or lower --n"
            )
        providers = resolve_providers(target.workflow, simulator)  # type: ignore[arg-type]
        result = run_replay(target, providers, args.n, args.concurrency)
    if args.json:
        rows = [{"outcome": k, "count": c, "rate": r, "low": lo, "high": hi} for k, c, r, lo, hi in result.rates()]
        console.print_json(
            json.dumps(
                {
                    "step": args.step,
                    "model": target.request.model,
                    "n": args.n,
                    "recorded": target.recorded,
                    "outcomes": rows,
                    "cost_usd": result.cost_usd,
                }
            )
        )
        return 0
    for renderable in render(result):
        console.print(renderable)
    return 0
