"""What the attempt journal costs (issue 13 item 3): side by side, the same batch with and without it.

    python benchmarks/journal.py --runs 2000 [--steps 2] [--time-scale 0.01] [--in-flight 200]

Prints, for each side: wall time, runs/s, p50/p99 run latency, and the journal's reports; then the
per-attempt cost on the executor's event loop (what an attempt's path pays: appends) and the
background cost per report (building the entries), measured in-process. Both sides run in one process
on one cluster, alternating, so machine load affects both; the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from typing import Any

import ray

from tailrace.actors.attempt_journal import JournalingObserver, JournalReporter, _compact, start_journal
from tailrace.cluster.api import connect
from tailrace.cluster.driver import WorkflowDriver, run_records
from tailrace.cluster.pool import ExecutorPool, PoolConfig
from tailrace.cluster.providers import SimulatorEndpoints, resolve_providers
from tailrace.cluster.results import BatchSummary, ResultWriter
from tailrace.engine.clock import SYSTEM_CLOCK
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, RunOutcome
from tailrace.engine.sim import SimServer, scenario
from tailrace.engine.specs import HedgeConfig, RunOptions
from tailrace.runtime.step_runner import StepRequest


def workflow(steps: int) -> Any:
    spec: dict[str, Any] = {"name": "journal_bench", "inputs": ["ticket"], "steps": []}
    for i in range(steps):
        step: dict[str, Any] = {
            "id": f"s{i}",
            "prompt": "Answer {{input.ticket}}" + (f" after {{{{steps.s{i - 1}}}}}" if i else ""),
            "models": [{"provider": "openai", "model": "gpt-4.1-mini", "max_tokens": 60}],
        }
        if i:
            step["depends_on"] = [f"s{i - 1}"]
        spec["steps"].append(step)
    return workflow_from_dict(spec)


async def one_batch(spec: Any, providers: Any, runs: int, in_flight: int, journal: bool) -> dict[str, Any]:
    name = f"tailrace-attempt-journal-bench-{uuid.uuid4().hex[:8]}"
    handle = start_journal(name) if journal else None
    kwargs = {"hedge": HedgeConfig(), "journal_name": name if journal else None}
    outcomes: list[RunOutcome] = []
    summary = BatchSummary()
    async with ExecutorPool(providers, PoolConfig.fixed(2), executor_kwargs=kwargs) as pool:
        driver = WorkflowDriver(spec, RunOptions(deadline_s=30), pool, hedge=HedgeConfig(), journal=handle)
        records = [(f"r{i}", {"ticket": f"T-{i}"}) for i in range(runs)]
        started = time.perf_counter()
        await run_records(driver, records, ResultWriter(None), summary, in_flight, outcomes.append)
        wall = time.perf_counter() - started
    stats = await handle.stats.remote() if handle is not None else {"reports": 0, "steps": 0}
    if handle is not None:
        ray.kill(handle)
    latencies = sorted(o.latency_s for o in outcomes)
    return {
        "journal": journal,
        "runs": summary.runs,
        "delivered": summary.delivered,
        "wall_s": wall,
        "runs_per_s": runs / wall,
        "p50_s": latencies[len(latencies) // 2],
        "p99_s": latencies[int(len(latencies) * 0.99) - 1],
        "attempts": summary.attempts,
        "reports": stats["reports"],
        "left_in_journal": stats["steps"],
    }


class _Quiet:
    def attempt_started(self, *args: Any) -> None: ...

    def attempt_ended(self, *args: Any) -> None: ...

    def step_ended(self, *args: Any) -> None: ...


def per_attempt_cost(spec: Any, n: int = 50_000) -> tuple[float, float]:
    """(seconds per attempt on the attempt's path, seconds per attempt in the background report)."""
    from tailrace.engine.clock import RunDeadline

    reporter = JournalReporter("unused", SYSTEM_CLOCK)
    observer = JournalingObserver(_Quiet(), reporter)
    step = spec.steps[0]
    choice = step.models[0]
    request = StepRequest(
        run_id="r",
        workflow=spec.name,
        tenant="t",
        step=step,
        inputs={"ticket": "T-1"},
        upstream={},
        deadline=RunDeadline.start(30, SYSTEM_CLOCK),
    )
    record = AttemptRecord(
        run_id="r",
        step_id=step.id,
        attempt=0,
        provider="openai",
        model="gpt-4.1-mini",
        started_at=0.0,
        ended_at=1.0,
        latency_s=1.0,
        outcome=AttemptOutcome.VALID,
    )
    requests = [request.model_copy(update={"run_id": f"r{i}"}) for i in range(1000)]
    started = time.perf_counter()
    for i in range(n):
        req = requests[i % 1000]
        observer.attempt_started(req, choice, "primary")
        observer.attempt_ended(req, record)
    path = (time.perf_counter() - started) / n
    pending, reporter._pending = reporter._pending, []
    started = time.perf_counter()
    _compact(pending)
    background = (time.perf_counter() - started) / n
    return path, background


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--time-scale", type=float, default=0.01)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (without, with)")
    args = parser.parse_args()
    spec = workflow(args.steps)
    connect()
    results: list[dict[str, Any]] = []
    with SimServer.in_thread(scenario("clean", seed=1, time_scale=args.time_scale)) as sim:
        providers = resolve_providers(spec, SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url))
        for _ in range(args.rounds):
            for journal in (False, True):
                results.append(asyncio.run(one_batch(spec, providers, args.runs, args.in_flight, journal)))
                print(results[-1], f"load {os.getloadavg()[0]:.1f}", flush=True)
    for journal in (False, True):
        side = [r for r in results if r["journal"] == journal]

        def med(key: str, side: list[dict[str, Any]] = side) -> float:
            return statistics.median(r[key] for r in side)

        print(
            f"journal {'on ' if journal else 'off'}: runs/s {med('runs_per_s'):7.1f}  p50 {med('p50_s'):.3f} s  "
            f"p99 {med('p99_s'):.3f} s  delivered {sum(r['delivered'] for r in side)}/{sum(r['runs'] for r in side)}  "
            f"reports {sum(r['reports'] for r in side)}  left in journal {sum(r['left_in_journal'] for r in side)}"
        )
    path, background = per_attempt_cost(spec)
    print(f"per attempt: {path * 1e6:.1f} us on its path (start + end), {background * 1e6:.1f} us in the report")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
