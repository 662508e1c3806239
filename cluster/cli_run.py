"""`tailrace run`, `tailrace demo` (a batch on this machine's Ray, or one `--address` names) and
`tailrace sim` (the provider simulator on its own).

`run` and `demo` write results as runs finish. User code a workflow names by import path
(`validators: ["checks:ticket_ok"]`, `schema_model: "checks:Triage"`) may live in modules next to the
workflow file: they are importable here and shipped with the executors. Running the same command again resumes: the runs
already in the results file are skipped, and it says so. A results file written by a different batch
(another workflow, other inputs, other options) is refused until `--fresh` (start over) or another
`--out`. Exit status: 0 when every run of the batch is delivered, 1 when some run is not, 2 on bad
input or a setup that cannot work (the batch stops at the first configuration error), 130 when
interrupted (what finished is kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tailrace.cluster import cli_common as common
from tailrace.cluster.results import BatchSummary
from tailrace.cluster.resume import BatchIdentity, resume
from tailrace.cluster.trace import default_trace_path
from tailrace.engine.errors import InputError
from tailrace.engine.loading import check_inputs, load_inputs
from tailrace.engine.spec_checks import check_validators_registered

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO_WORKFLOW = EXAMPLES / "support_triage" / "workflow.yaml"
DEMO_INPUTS = EXAMPLES / "support_triage" / "inputs.jsonl"


def register(sub: Any) -> dict[str, Any]:
    run = sub.add_parser("run", help="run a batch of input records through a workflow")
    run.add_argument("workflow", help="workflow spec (.yaml or .json)")
    run.add_argument("--inputs", required=True, help="input records, one JSON object per line")
    _batch_options(run)

    demo = sub.add_parser("demo", help="run the bundled example workflow on its bundled inputs")
    _batch_options(demo)

    sim = sub.add_parser("sim", help="serve the provider simulator (OpenAI and Anthropic wire formats)")
    sim.add_argument("--scenario", default="clean", choices=common.SCENARIO_NAMES)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--time-scale", type=float, default=1.0, help="multiply simulated durations")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--log", help="JSONL request log")
    return {"run": run_batch_command, "demo": demo_command, "sim": serve_simulator}


def interrupted(args: argparse.Namespace) -> str:
    if args.command in ("run", "demo") and getattr(args, "out", None):
        return f"interrupted: the finished runs are in {args.out}; run the same command again to resume"
    return "interrupted"


def _batch_options(p: argparse.ArgumentParser) -> None:
    common.add_run_options(p)
    p.add_argument("--address", help="Ray cluster address, e.g. HEAD:6379 (default: start a local one)")
    p.add_argument("--out", help="results JSONL (default: results-<workflow>.jsonl)")
    p.add_argument("--fresh", action="store_true", help="replace the results file's runs instead of resuming them")
    p.add_argument("--executors", type=int, default=2, help="step executor actors")
    p.add_argument("--concurrency", type=int, default=64, help="runs in flight at once")
    common.add_simulator_options(p)


def demo_command(args: argparse.Namespace) -> int:
    args.workflow, args.inputs = str(DEMO_WORKFLOW), str(DEMO_INPUTS)
    return run_batch_command(args)


def run_batch_command(args: argparse.Namespace) -> int:
    from tailrace.cluster.api import run_batch
    from tailrace.cluster.config import BatchConfig
    from tailrace.cluster.engine import load_workflow_beside
    from tailrace.cluster.pool import PoolConfig

    workflow, beside = load_workflow_beside(args.workflow)
    check_validators_registered(workflow)  # names only Python can register: say so before anything starts
    if not Path(args.inputs).is_file():
        raise InputError(f"inputs file {args.inputs!r} does not exist")
    options = common.run_options(workflow.defaults, args)
    args.out = out = args.out or f"results-{workflow.name}.jsonl"
    ids = []
    for line, record in load_inputs(args.inputs):  # every record checked before anything starts
        check_inputs(workflow, record, line, source=args.inputs)
        ids.append(str(record.get("run_id") or record.get("id") or f"run-{line:06d}"))
    # Before anything starts: another batch's results file is refused, this batch's finished runs skipped.
    state = resume(out, BatchIdentity.of(workflow, args.inputs, options), fresh=args.fresh)
    if state.note:
        common.note(state.note)
    done = state.skip & set(ids)
    if len(done) == len(ids):
        return _report_whole(out, workflow.name, options.deadline_s, 0)
    config = BatchConfig(pool=PoolConfig.fixed(args.executors), max_in_flight=args.concurrency, user_modules=beside)
    with common.simulator_for(workflow, args) as simulator, common.library_notes(), common.progress() as bar:
        task = bar.add_task(workflow.name, total=len(ids) - len(done))
        summary = run_batch(
            workflow,
            args.inputs,
            options=options,
            out=out,
            config=config,
            providers=simulator,
            address=args.address,
            on_done=lambda _: bar.advance(task),
        )
    if done:  # earlier runs of this batch count too: the table is the whole results file's
        return _report_whole(out, workflow.name, options.deadline_s, summary.runs)
    common.console.print(common.summary_table(summary, workflow.name, options.deadline_s))
    _where(out)
    return common.EXIT_OK if summary.delivered == summary.runs else common.EXIT_NOT_ALL_DELIVERED


def _report_whole(out: str, name: str, deadline_s: float, now: int) -> int:
    from tailrace.cluster.report import read_results

    whole = BatchSummary()
    for outcome in read_results(out):
        whole.add(outcome)
    title = f"{name}: {whole.runs} runs ({now} now, {whole.runs - now} earlier), deadline {deadline_s:g} s"
    common.console.print(common.summary_table(whole, name, deadline_s, title=title))
    _where(out)
    return common.EXIT_OK if whole.delivered == whole.runs else common.EXIT_NOT_ALL_DELIVERED


def _where(out: str) -> None:
    common.console.print(
        f"results: {out}   trace: {default_trace_path(out)}   tail report: tailrace report {out}", highlight=False
    )


def serve_simulator(args: argparse.Namespace) -> int:
    from tailrace.engine.sim import run_forever, scenario

    config = scenario(args.scenario, seed=args.seed, time_scale=args.time_scale)
    common.console.print(
        f"simulator: scenario {args.scenario!r}, seed {args.seed}, on http://{args.host}:{args.port} "
        f"(OpenAI base URL http://{args.host}:{args.port}/v1)"
    )
    run_forever(config, args.host, args.port, args.log)
    return common.EXIT_OK
