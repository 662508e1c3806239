"""The `tailrace` subcommands for living with a cluster: submit, status, logs, results, stop (batches
as Ray jobs), report (the tail report and its plot) and replay (behaviour rates of one request).

`status` exits 1 when the batch's job failed (and shows the end of its logs), 0 otherwise. Every hint
printed for following a job carries the `--address` it was submitted to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape

from tailrace.cluster import cli_common as common
from tailrace.cluster import jobs
from tailrace.cluster.pool import PoolConfig
from tailrace.cluster.providers import resolve_providers
from tailrace.cluster.replay import load_target, run_replay, worst_case_cost_usd
from tailrace.cluster.replay import render as render_replay
from tailrace.cluster.report import PLOT_INSTALL_HINT, build_report, plot_cdf, read_results, render, report_json
from tailrace.cluster.results import BatchSummary
from tailrace.cluster.trace import default_trace_path, read_trace
from tailrace.engine.errors import InputError
from tailrace.engine.loading import check_inputs, load_inputs, load_workflow
from tailrace.engine.specs import WorkflowSpec

COMMANDS = ("submit", "status", "logs", "results", "stop", "report", "replay")
console = common.console


def register(sub: Any) -> dict[str, Any]:
    scenario_names = common.SCENARIO_NAMES
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
    submit.add_argument(
        "--python",
        help="the Python interpreter that runs the job on the head node (default: this one for a cluster on this "
        "machine, else `python`, checked for Ray before the batch starts)",
    )
    submit.add_argument("--results-dir", default=None, help="on the head node (default: ~/.tailrace/jobs)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    common.add_run_options(submit)
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
    results.add_argument("--python", help="the head node's Python interpreter for the helper job (as for submit)")
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
    return {
        "submit": _submit,
        "status": _status,
        "logs": _logs,
        "results": _results,
        "stop": _stop,
        "report": _report,
        "replay": _replay,
    }


def interrupted(args: argparse.Namespace) -> str:
    if args.command == "replay":
        return "interrupted: the replay stopped; nothing was written"
    if args.command in ("status", "logs"):
        return "interrupted (the job itself goes on: `tailrace stop` stops it)"
    return "interrupted"


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS or "
        "http://127.0.0.1:8265); Ray's auth token is sent when configured",
    )


def _submit(args: argparse.Namespace) -> int:
    from tailrace.cluster.engine import load_workflow_beside  # imports Ray: not before the input is checked

    workflow, _ = load_workflow_beside(args.workflow)  # the job's working directory ships those modules
    if not Path(args.inputs).is_file():
        raise InputError(f"inputs file {args.inputs!r} does not exist")
    for line, record in load_inputs(args.inputs):  # every record checked before anything is sent
        check_inputs(workflow, record, line, source=args.inputs)
    options = common.run_options(workflow.defaults, args)
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
        options.model_dump(),
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
    sid = submission.submission_id
    console.print(f"{sid}: {verb}", highlight=False)
    where = f" --address {args.address}" if args.address else ""
    console.print(
        f"follow it: tailrace status {sid}{where}   tailrace logs {sid}{where} -f   tailrace results {sid}{where}",
        highlight=False,
    )
    if args.wait:
        final = jobs.wait(sid, args.address)
        console.print(f"{sid}: {final}", highlight=False)
        if final != "SUCCEEDED":
            _last_log_lines(sid, args.address)
        return common.EXIT_OK if final == "SUCCEEDED" else common.EXIT_NOT_ALL_DELIVERED
    return common.EXIT_OK


def _last_log_lines(sid: str, address: str | None, n: int = 15) -> None:
    tail = next(jobs.logs(sid, address)).rstrip().splitlines()[-n:]
    console.print("last lines of its logs:\n" + "\n".join(tail), markup=False, highlight=False)


def _status(args: argparse.Namespace) -> int:
    state = jobs.status(args.submission_id, args.address)
    failed = state.status == "FAILED"
    if args.json:
        console.print_json(json.dumps(state.as_dict()))
        return common.EXIT_NOT_ALL_DELIVERED if failed else common.EXIT_OK
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
    if failed:
        _last_log_lines(state.submission_id, args.address)
        return common.EXIT_NOT_ALL_DELIVERED
    return common.EXIT_OK


def _logs(args: argparse.Namespace) -> int:
    for chunk in jobs.logs(args.submission_id, args.address, follow=args.follow):
        sys.stdout.write(chunk)
    return common.EXIT_OK


def _stop(args: argparse.Namespace) -> int:
    stopped = jobs.stop(args.submission_id, args.address)
    console.print(
        f"{args.submission_id}: {'stopping' if stopped else 'not running'}; finished runs are kept, "
        "submit it again to resume"
    )
    return common.EXIT_OK


def _results(args: argparse.Namespace) -> int:
    out = Path(args.out or f"results-{args.submission_id}.jsonl")
    where = {
        "address": args.address,
        "results_dir": args.results_dir or jobs.DEFAULT_RESULTS_DIR,
        "python": args.python,
        "via_job": True if args.via_job else None,
    }
    jobs.fetch_results(args.submission_id, out, **where)
    trace = default_trace_path(out)
    try:
        jobs.fetch_results(args.submission_id, trace, what="trace", **where)
    except jobs.JobError:
        trace = None  # type: ignore[assignment]
    summary = BatchSummary()
    deadlines = []
    for outcome in read_results(out):
        summary.add(outcome)
        deadlines.append(outcome.deadline_at - outcome.started_at)
    name = next(iter(read_results(out))).workflow if summary.runs else args.submission_id
    console.print(common.summary_table(summary, name, sorted(deadlines)[len(deadlines) // 2] if deadlines else 0))
    console.print(f"results: {out}" + (f"   trace: {trace}" if trace else "") + f"   report: tailrace report {out}")
    return common.EXIT_OK


def _report(args: argparse.Namespace) -> int:
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
        return common.EXIT_OK
    for renderable in render(report):
        console.print(renderable)
    if plot is not None:
        console.print(f"latency CDF: {plot}")
    return common.EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    if not Path(args.trace).is_file():
        raise InputError(f"trace file {args.trace!r} does not exist")
    if args.n < 1:
        raise InputError("--n must be at least 1")
    target = load_target(args.trace, args.step, args.run, args.attempt)
    with common.simulator_for(target.workflow, args) as simulator:
        worst = worst_case_cost_usd(target, args.n)
        if simulator is None and worst > args.max_cost:
            raise InputError(
                f"replaying {args.n} times may cost up to ${worst:.2f}, over --max-cost "
                f"${args.max_cost:.2f}; raise --max-cost or lower --n"
            )
        providers = resolve_providers(target.workflow, simulator)
        if args.json:
            result = run_replay(target, providers, args.n, args.concurrency)
        else:
            with common.progress() as bar:
                task = bar.add_task(f"replay {target.step.id} ({target.request.model})", total=args.n)
                result = run_replay(target, providers, args.n, args.concurrency, on_done=lambda: bar.advance(task))
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
        return common.EXIT_OK
    for renderable in render_replay(result):
        console.print(renderable)
    return common.EXIT_OK
