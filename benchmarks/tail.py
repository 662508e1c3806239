"""Tail latency of the demo workflow on four latency families, side by side, beside the limit.

The 6-step support-triage workflow (examples/support_triage: one step, three in parallel, then two)
runs N times per contender on the time-scaled simulator (in its own process, one per contender, same
seed), on each latency family of `tailrace.engine.sim.config.FAMILIES` (heavy-tail-mix, pareto,
bimodal, brownout-mix). Contenders take turns in chunks, so a change in the load of this shared
machine falls on all of them alike:

  (a) by hand:   the official OpenAI SDK, a per-call timeout and its own retries (max_retries=2),
                 steps awaited per the DAG with asyncio, an invalid answer asked again (3 tries);
  (b) tailrace, hedging off:  the same policy without duplicates (attempt timeouts, retries);
  (c) tailrace:  the full tail-control policy (`max_extra_load` 5 %);
  (d) LiteLLM's Router as its docs recommend (needs the `bench` extra; skipped when not installed);
  limit: a Monte Carlo of an oracle hedging policy with the same extra-load budget on the same
         distribution (`_oracle.py`, pure Python on a fake clock, attempts drawn by the simulator's
         own planner).

Latencies are in *simulated* seconds (real seconds / time scale). The deadline for the hit rate is 2x
(a)'s p50; (b) and (c) are given it as their run deadline, (a) and (d) have none. A run that did not
deliver a valid result counts as infinitely late. Tokens come from the simulator's request log
(cancelled requests included, with the tokens generated before the cancel); extra tokens = billed /
tokens of the answers served in full - 1.

    python benchmarks/tail.py --families all [--runs 2000] [--time-scale 0.1] [--concurrency 16]
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _oracle import oracle_limit
from _oracle import summary as oracle_summary
from _sim_process import simulator_process
from _tail_contenders import Contender, HandWritten, LiteLLMRouter, RunResult, Tailrace
from _tail_report import (
    plot,
    print_table,
    print_targets,
    quantile,
    sim_log_totals,
    summarise,
    summarise_latencies,
    targets,
)

from tailrace.engine.loading import load_inputs, load_workflow
from tailrace.engine.sim import scenario
from tailrace.engine.sim.config import FAMILIES
from tailrace.engine.specs import HedgeConfig, WorkflowSpec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "support_triage"
RESULTS = ROOT / "benchmarks" / "results"
CALL_TIMEOUT_SIM_S = 10.0  # (a) and (d): about 3x the first rung's expected latency


# ---- the workload --------------------------------------------------------------------------------------


def scaled_workflow(scale: float) -> WorkflowSpec:
    """The demo workflow with its latency priors in real seconds of the scaled simulator."""
    spec = load_workflow(EXAMPLE / "workflow.yaml")
    steps = []
    for step in spec.steps:
        models = [
            m.model_copy(
                update={
                    "expected_ttft_s": m.expected_ttft_s * scale,
                    "expected_latency_s": m.expected_latency_s * scale,
                }
            )
            for m in step.models
        ]
        steps.append(step.model_copy(update={"models": models}))
    return spec.model_copy(update={"steps": steps})


def records(n: int) -> list[tuple[str, dict[str, Any]]]:
    """N runs over the bundled tickets, each with its own ticket and order ids (so its own draws)."""
    base = [r for _, r in load_inputs(EXAMPLE / "inputs.jsonl")]
    out = []
    for i in range(n):
        r = dict(base[i % len(base)])
        r["ticket_id"], r["order_id"] = f"{r['ticket_id']}-{i:04d}", f"{r['order_id']}-{i:04d}"
        r["id"] = f"run-{i:05d}"
        out.append((r["id"], r))
    return out


def natural_floor(workflow: WorkflowSpec, n: int = 20_000, seed: int = 1) -> dict[str, float]:
    """The run latency this DAG would have with no fault at all and a free engine, every step on its
    first rung, drawn from the simulator's own latency model: the floor of p99/p50 for a contender that
    does not change models."""
    import random

    from tailrace.engine.dag import Dag
    from tailrace.engine.sim.config import SimConfig

    config, rng = SimConfig(), random.Random(seed)
    dag = Dag.from_spec(workflow)

    def step(step_id: str) -> float:
        choice = workflow.step(step_id).models[0]
        p = config.profile(choice.model)
        ttft = p.ttft_median_s * math.exp(rng.gauss(0, p.ttft_sigma))
        tps = p.tokens_per_s * math.exp(rng.gauss(0, p.tps_sigma))
        out = min(
            max(8.0, p.output_tokens_median * math.exp(rng.gauss(0, p.output_tokens_sigma))), 0.9 * choice.max_tokens
        )
        return ttft + out / tps

    runs = []
    for _ in range(n):
        finish: dict[str, float] = {}
        for s in dag.topological_order():
            finish[s] = max((finish[p] for p in dag.parents(s)), default=0.0) + step(s)
        runs.append(max(finish.values()))
    p50 = quantile(runs, 0.5)
    return {"p50": p50, "p99/p50": quantile(runs, 0.99) / p50, "p99.9/p50": quantile(runs, 0.999) / p50}


def litellm_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("litellm") is not None
    except ImportError:
        return False


def race(
    family: str, args: argparse.Namespace, contenders: str, workflow: WorkflowSpec, tmp: str, loads: list[float]
) -> tuple[dict[str, list[RunResult]], dict[str, float], float]:
    """Every contender on one family, chunk by chunk; the results, wall time per contender, deadline."""
    scale = args.time_scale
    recs = records(args.runs)
    size = math.ceil(len(recs) / args.chunks)
    chunks = [recs[i : i + size] for i in range(0, len(recs), size)]
    timeout = CALL_TIMEOUT_SIM_S * scale
    results: dict[str, list[RunResult]] = {key: [] for key in contenders}
    wall: dict[str, float] = dict.fromkeys(contenders, 0.0)
    deadline_s = math.inf
    hedge = HedgeConfig(max_extra_load=args.max_extra_load)
    with contextlib.ExitStack() as stack:
        # One simulator per contender, same seed; contenders take turns chunk by chunk, so a change in
        # the machine's load (it is shared) falls on all of them alike.
        racers: dict[str, Contender] = {}
        for key in contenders:
            log = str(Path(tmp) / f"{family}-{key}.jsonl")
            root = stack.enter_context(simulator_process(family, args.seed, scale, log))
            if key == "a":
                racers[key] = HandWritten(root, workflow, args.concurrency, timeout, scale)
            elif key == "d":
                racers[key] = LiteLLMRouter(root, workflow, args.concurrency, timeout, scale)
            else:
                name = f"tailrace-bench-{family}-{key}-{os.getpid()}"
                racers[key] = Tailrace(root, workflow, args.concurrency, scale, key == "c", name, hedge)
            stack.callback(racers[key].close)
        for i, chunk in enumerate(chunks):
            for key, racer in racers.items():
                t0 = time.perf_counter()
                results[key] += racer.run(chunk)
                wall[key] += time.perf_counter() - t0
                if key == "a" and i == 0:
                    # The deadline: 2x (a)'s p50 over its first chunk, given to (b) and (c).
                    deadline_s = 2 * quantile([r.latency_s if r.ok else math.inf for r in results["a"]], 0.5)
                    for r in racers.values():
                        if isinstance(r, Tailrace):
                            r.deadline_s = deadline_s
            loads.append(os.getloadavg()[0])
            print(f"{family}: chunk {i + 1}/{len(chunks)} done (load average {loads[-1]:.1f})", flush=True)
    return results, wall, deadline_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--time-scale", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--families", nargs="+", default=["all"], help=f"'all' or some of {', '.join(FAMILIES)}")
    parser.add_argument("--contenders", default="abcd", help="which of a, b, c, d to run (a always runs)")
    parser.add_argument("--chunks", type=int, default=4, help="contenders take turns, this many chunks each")
    parser.add_argument("--max-extra-load", type=float, default=HedgeConfig().max_extra_load)
    parser.add_argument("--out", default=str(RESULTS / "tail.json"))
    parser.add_argument("--plot", default=str(RESULTS / "tail_cdf.png"))
    args = parser.parse_args()
    families = list(FAMILIES) if args.families == ["all"] else args.families
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Ray starts its workers at nice 15; (a) and (d) run in this process at nice 0. On a shared machine
    # that alone would hand the others' CPU load to tailrace's executors, so every contender gets 0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray

    scale = args.time_scale
    workflow = scaled_workflow(scale)
    contenders = "a" + args.contenders.replace("a", "")
    if "d" in contenders and not litellm_available():
        print("LiteLLM is not installed: contender (d) skipped (see BENCHMARKS.md to install it)")
        contenders = contenders.replace("d", "")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    started = time.perf_counter()
    all_rows: dict[str, dict[str, dict[str, Any]]] = {}
    deadlines: dict[str, float] = {}
    loads: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            loads[family] = [os.getloadavg()[0]]
            results, wall, deadline_s = race(family, args, contenders, workflow, tmp, loads[family])
            deadline_sim = deadline_s / scale
            rows: dict[str, dict[str, Any]] = {
                key: {
                    **summarise(res, scale, deadline_sim),
                    "sim": sim_log_totals(Path(tmp) / f"{family}-{key}.jsonl", workflow),
                    "runs": len(res),
                    "wall_s": wall[key],
                }
                for key, res in results.items()
            }
            limit = oracle_limit(
                scenario(family, seed=args.seed),
                load_workflow(EXAMPLE / "workflow.yaml"),
                args.runs,
                max_extra_load=args.max_extra_load,
                concurrency=args.concurrency,
            )
            o = oracle_summary(limit)
            rows["o"] = {**o, **summarise_latencies(o["latencies_sim_s"], deadline_sim)}
            rows["o"]["extra_tokens"] = limit.extra_tokens
            deadlines[family] = deadline_sim
            all_rows[family] = rows
            print_table(family, rows, deadline_sim, loads[family])
            print(f"\nlimit's backup delays (simulated s: TTFT, latency, median decode rate): {limit.delays}")
            print_targets(family, rows)
    ray.shutdown()
    floor = natural_floor(load_workflow(EXAMPLE / "workflow.yaml"))
    every = [x for v in loads.values() for x in v]
    print(
        f"\nno-fault floor of this DAG on its first rung (simulator's latency model, free engine): "
        f"p50 {floor['p50']:.2f} s, p99/p50 {floor['p99/p50']:.2f}, p99.9/p50 {floor['p99.9/p50']:.2f}"
    )
    print(
        f"total {time.perf_counter() - started:.0f} s; time scale {scale}, seed {args.seed}, concurrency "
        f"{args.concurrency}, max_extra_load {args.max_extra_load}; 1-minute load average "
        f"{min(every):.1f}-{max(every):.1f} on {os.cpu_count()} cores"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "deadlines_sim_s": deadlines,
                "load_average": loads,
                "floor": floor,
                "targets": {f: targets(f, rows) for f, rows in all_rows.items()},
                "results": {
                    f: {k: {kk: vv for kk, vv in v.items() if kk != "latencies_sim_s"} for k, v in rows.items()}
                    for f, rows in all_rows.items()
                },
            },
            indent=1,
            default=str,
        )
    )
    try:
        plot(all_rows, deadlines, Path(args.plot))
        print(f"plot: {args.plot}")
    except ImportError:
        print("matplotlib is not installed (the `plot` extra): no plot written")


if __name__ == "__main__":
    main()
