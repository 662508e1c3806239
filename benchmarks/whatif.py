"""What-if accuracy: predict policy B from a trace of policy A, then run B and compare.

For each latency family (simulator scenario), the demo workflow (examples/support_triage: 6 steps,
ladder gpt-4.1 -> claude-haiku-4-5 -> gpt-4o-mini) runs on the time-scaled simulator through
`run_batch` on Ray under policy A (the default tail control, a fixed deadline), writing its trace, and
under every policy B, each on its own simulator with its own seed. The policies take turns in chunks
of runs, so a change in this shared machine's load falls on all of them alike. Ray is shut down, and
`tailrace.what_if` predicts each B from A's trace alone (fake time, in this process). Predicted and
measured are printed side by side, with the misses against the targets:

  hit rate within 0.5 percentage points, p99 within 10 %, extra tokens within 2 points,
  replay speed >= 2,000 simulated runs per CPU second for the 6-step workflow.

The B policies: A itself (a new seed: how well the what-if reproduces what it was fitted on), an
earlier hedge trigger (TTFT quantile 0.8), hedging off, a shorter deadline, and a token budget that
binds (60 % of the token rate A used). Latencies are in simulated seconds (real / time scale).

    python benchmarks/whatif.py [--runs 1000] [--time-scale 0.1] [--concurrency 16] [--replays 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _sim_process import simulator_process
from tail import records, scaled_workflow

from tailrace.engine.specs import HedgeConfig, RunOptions, WorkflowSpec
from tailrace.policies.budget_config import BudgetConfig, LimitSpec
from tailrace.policies.hedging import TailTuning, scaled_hedge
from tailrace.whatif.change import WhatIf
from tailrace.whatif.prediction import Metrics, trace_metrics
from tailrace.whatif.trace_data import read_trace

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEADLINE_SIM_S = {"heavy-tail": 16.0, "brownout": 17.0}
SHORT_DEADLINE_SIM_S = {"heavy-tail": 12.0, "brownout": 13.0}
BUDGET_SHARE = 0.6  # of the token rate A used
TARGETS = {"hit_rate_pp": 0.5, "p99_pct": 10.0, "extra_tokens_pts": 2.0, "runs_per_s": 2000.0}


def changes(family: str, scale: float) -> dict[str, WhatIf]:
    """The B policies but the budget one (its quota comes from A's first chunk)."""
    return {
        "A again (new seed)": WhatIf(),
        "TTFT trigger at p80": WhatIf(hedge={"ttft_quantile": 0.8}),
        "hedging off": WhatIf(hedge={"enabled": False}),
        f"deadline {SHORT_DEADLINE_SIM_S[family]:g} s": WhatIf(deadline_s=SHORT_DEADLINE_SIM_S[family] * scale),
    }


@dataclass
class Setup:
    workflow: WorkflowSpec
    options: RunOptions  # A's
    hedge: HedgeConfig  # A's
    tuning: TailTuning
    concurrency: int


def run_chunk(
    setup: Setup, root: str, recs: list[tuple[str, dict[str, Any]]], change: WhatIf, trace: Path, stats: str
) -> None:
    """Some runs of one policy on its simulator; its trace grows by a batch."""
    from tailrace.cluster.api import run_batch
    from tailrace.cluster.pool import NoExecutorError, PoolConfig
    from tailrace.cluster.providers import SimulatorEndpoints
    from tailrace.cluster.trace import TraceConfig

    hedge = HedgeConfig.model_validate({**setup.hedge.model_dump(), **change.hedge})
    options = setup.options.model_copy(update={"deadline_s": change.deadline_s or setup.options.deadline_s})
    accounts = ("openai", "anthropic")
    budget = BudgetConfig(limits=[LimitSpec(account=a, tpm=change.tpm) for a in accounts]) if change.tpm else None
    for attempt in range(3):
        try:
            run_batch(
                setup.workflow,
                (r for _, r in recs),
                options=options,
                max_in_flight=setup.concurrency,
                simulator=SimulatorEndpoints(root + "/v1", root),
                hedge=hedge,
                tuning=setup.tuning,
                budget=budget,
                trace=TraceConfig(path=str(trace)),
                stats_name=stats,  # the executors' latency windows carry over from chunk to chunk
                # On a loaded machine an executor's process can take a minute to start.
                pool=PoolConfig.fixed(2, start_timeout_s=240),
            )
            return
        except NoExecutorError:
            if attempt == 2:
                raise
            time.sleep(30)


def record_family(
    family: str,
    setup: Setup,
    recs: list[tuple[str, dict[str, Any]]],
    chunks: int,
    seed: int,
    scale: float,
    workdir: Path,
) -> dict[str, WhatIf]:
    """A and every B on their own simulators, taking turns in chunks, so a change in this shared
    machine's load falls on all of them alike. Returns the B policies (name -> change)."""
    import ray

    from tailrace.actors.latency_stats import NAMESPACE

    plans = changes(family, scale)
    names = ["A", *plans, "budget"]
    size = math.ceil(len(recs) / chunks)
    with contextlib.ExitStack() as stack:
        roots = {
            name: stack.enter_context(simulator_process(family, seed + 100 * i, scale)) for i, name in enumerate(names)
        }
        for c in range(chunks):
            part = recs[c * size : (c + 1) * size]
            for name in names[c % len(names) :] + names[: c % len(names)]:
                if name == "budget" and "budget" not in plans:
                    continue  # its quota comes from A's first chunk, which runs first
                i = names.index(name)
                change = WhatIf() if name == "A" else plans[name]
                started = time.perf_counter()
                run_chunk(
                    setup, roots[name], part, change, workdir / f"{family}-{i}.trace.jsonl", f"whatif-{family}-{i}"
                )
                print(
                    f"{family}: chunk {c + 1}/{chunks} of {name!r} in {time.perf_counter() - started:.0f} s "
                    f"(load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
                if name == "A" and c == 0:
                    tpm = int(BUDGET_SHARE * tokens_per_minute(workdir / f"{family}-0.trace.jsonl"))
                    plans[f"budget {tpm:,} TPM"] = plans["budget"] = WhatIf(tpm=tpm)
        for i in range(len(names)):
            with contextlib.suppress(Exception):
                ray.kill(ray.get_actor(f"whatif-{family}-{i}", namespace=NAMESPACE))
    del plans["budget"]
    return plans


def tokens_per_minute(trace: Path) -> float:
    data = read_trace(trace)
    return sum(a.tokens for a in data.attempts) / data.span_s * 60


def compare(pred: Any, measured: Metrics, scale: float) -> dict[str, Any]:
    p = pred.predicted
    row = {
        "hit_pred": p["hit_rate"].mean,
        "hit_low": p["hit_rate"].low,
        "hit_high": p["hit_rate"].high,
        "hit_meas": measured.hit_rate,
        "hit_se": math.sqrt(max(measured.hit_rate * (1 - measured.hit_rate), 1e-12) / measured.runs),
        "p50_pred": p["p50"].mean / scale,
        "p50_meas": measured.p50 / scale,
        "p99_pred": p["p99"].mean / scale,
        "p99_low": p["p99"].low / scale,
        "p99_high": p["p99"].high / scale,
        "p99_meas": measured.p99 / scale,
        "extra_pred": p["extra_tokens"].mean,
        "extra_meas": measured.extra_tokens,
        "cost_pred": p["cost_per_delivered_usd"].mean,
        "cost_meas": measured.cost_per_delivered_usd,
        "refused_pred": p["refused"].mean,
        "refused_meas": measured.refused,
        "runs_per_cpu_s": pred.runs_per_cpu_s,
    }
    row["hit_err_pp"] = 100 * (row["hit_pred"] - row["hit_meas"])
    row["p99_err_pct"] = 100 * (row["p99_pred"] / row["p99_meas"] - 1) if row["p99_meas"] > 0 else math.nan
    row["extra_err_pts"] = 100 * (row["extra_pred"] - row["extra_meas"])
    row["hit_in_interval"] = row["hit_low"] <= row["hit_meas"] <= row["hit_high"]
    row["meets"] = {
        "hit_rate": abs(row["hit_err_pp"]) <= TARGETS["hit_rate_pp"],
        "p99": abs(row["p99_err_pct"]) <= TARGETS["p99_pct"],
        "extra_tokens": abs(row["extra_err_pts"]) <= TARGETS["extra_tokens_pts"],
    }
    return row


def print_family(family: str, recorded: Metrics, rows: dict[str, dict[str, Any]], scale: float) -> None:
    print(
        f"\n### {family}: A = default tail control, deadline {DEADLINE_SIM_S[family]:g} s simulated; trace of A: "
        f"{recorded.runs} runs, hit {100 * recorded.hit_rate:.2f}%, p99 {recorded.p99 / scale:.2f} s, "
        f"extra tokens {100 * recorded.extra_tokens:.1f}%\n"
    )
    print(
        "| A -> B | hit rate predicted [95%] | measured (+-1 se) | error pp | p99 predicted | measured | error % "
        "| extra tokens pred / meas | error pts | p50 pred / meas | cost $/run pred / meas | refused pred / meas |"
    )
    print("|---|---|---|---:|---:|---:|---:|---|---:|---|---|---|")
    for name, r in rows.items():
        mark = {k: "" if ok else " **miss**" for k, ok in r["meets"].items()}
        print(
            f"| {name} | {100 * r['hit_pred']:.2f}% [{100 * r['hit_low']:.2f}, {100 * r['hit_high']:.2f}] "
            f"| {100 * r['hit_meas']:.2f}% (+-{100 * r['hit_se']:.2f}) | {r['hit_err_pp']:+.2f}{mark['hit_rate']} "
            f"| {r['p99_pred']:.2f} | {r['p99_meas']:.2f} | {r['p99_err_pct']:+.1f}{mark['p99']} "
            f"| {100 * r['extra_pred']:.1f}% / {100 * r['extra_meas']:.1f}% "
            f"| {r['extra_err_pts']:+.1f}{mark['extra_tokens']} "
            f"| {r['p50_pred']:.2f} / {r['p50_meas']:.2f} | {r['cost_pred']:.5f} / {r['cost_meas']:.5f} "
            f"| {r['refused_pred']:.0f} / {r['refused_meas']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--time-scale", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=4, help="policies take turns in this many chunks of runs")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--families", nargs="+", default=["heavy-tail", "brownout"])
    parser.add_argument("--keep", help="keep the traces in this directory")
    args = parser.parse_args()
    os.environ.setdefault("RAY_worker_niceness", "0")
    logging.getLogger("tailrace").setLevel(logging.WARNING)
    import ray

    # A cluster of our own: on a shared machine, ray.init() would join whichever cluster started last.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    scale = args.time_scale
    workflow = scaled_workflow(scale)
    recs = records(args.runs)
    hedge_a, tuning = scaled_hedge(HedgeConfig(), scale), TailTuning().scaled(scale)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="tailrace-whatif-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load: list[float] = []
    started = time.perf_counter()
    plans: dict[str, dict[str, WhatIf]] = {}
    for family in args.families:
        options_a = RunOptions(**{**workflow.defaults.model_dump(), "deadline_s": DEADLINE_SIM_S[family] * scale})
        setup = Setup(workflow, options_a, hedge_a, tuning, args.concurrency)
        plans[family] = record_family(family, setup, recs, args.chunks, args.seed, scale, workdir)
        load.append(os.getloadavg()[0])
    ray.shutdown()
    from tailrace.cluster.whatif import what_if

    results: dict[str, Any] = {"args": vars(args), "families": {}}
    for family in args.families:
        trace_a = workdir / f"{family}-0.trace.jsonl"
        rows = {}
        for i, (name, change) in enumerate(plans[family].items(), start=1):
            pred = what_if(trace_a, change, replays=args.replays, seed=args.seed)
            rows[name] = compare(pred, trace_metrics(read_trace(workdir / f"{family}-{i}.trace.jsonl")), scale)
            load.append(os.getloadavg()[0])
        recorded = trace_metrics(read_trace(trace_a))
        print_family(family, recorded, rows, scale)
        results["families"][family] = {"recorded_A": recorded.model_dump(), "pairs": rows}
    speed = replay_speed(workdir / f"{args.families[0]}-0.trace.jsonl", args.runs)
    print(
        f"\nreplay speed: {speed:,.0f} simulated runs per CPU second (6-step workflow, one core; "
        f"target >= {TARGETS['runs_per_s']:,.0f})"
    )
    took = time.perf_counter() - started
    print(f"load average during the benchmark: {min(load):.1f}-{max(load):.1f}; {took:.0f} s in all")
    results.update({"replay_runs_per_cpu_s": speed, "load": [min(load), max(load)], "traces": str(workdir)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "whatif.json").write_text(json.dumps(results, indent=1, default=str))


def replay_speed(trace: Path, runs: int) -> float:
    """CPU time of one replay of `runs` runs under the trace's own policy (the fit excluded)."""
    from tailrace.whatif.change import plan_for
    from tailrace.whatif.fit import fit_trace
    from tailrace.whatif.prediction import records_for
    from tailrace.whatif.replay import Replay

    data = read_trace(trace)
    fit = fit_trace(data)
    plan = plan_for(data, WhatIf())
    best = 0.0
    for seed in range(3):
        replay = Replay(fit, plan, records_for(data, runs), seed=seed)
        cpu = time.process_time()
        replay.run()
        best = max(best, runs / (time.process_time() - cpu))
    return best


if __name__ == "__main__":
    main()
