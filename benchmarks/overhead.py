"""Overhead of tailrace on Ray versus a bare asyncio loop, same simulator, same SDK, zero latency.

Side by side in one run: N single-step calls at concurrency C through (a) a bare asyncio loop on
`openai.AsyncOpenAI` streaming, (b) tailrace `run_batch` on a local Ray cluster (2 executors).
Prints steps/s, per-step latency percentiles and their ratios, then the driver's peak RSS across a
10,000-run batch (results stream to disk, so it must stay flat).

    python benchmarks/overhead.py [--runs 2000] [--concurrency 32] [--big 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import openai
from _sim_process import simulator_process

from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.specs import RunOptions

MODEL = "gpt-4o-mini"
PROMPT = "Summarise ticket {ticket_id} in one line."
WORKFLOW = workflow_from_dict(
    {
        "name": "overhead",
        "inputs": ["ticket_id"],
        "steps": [
            {
                "id": "summary",
                "prompt": "Summarise ticket {{input.ticket_id}} in one line.",
                "models": [{"provider": "openai", "model": MODEL, "max_tokens": 200}],
            }
        ],
    }
)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def bare_loop(root: str, runs: int, concurrency: int) -> tuple[float, list[float]]:
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="bench", max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            t0 = time.perf_counter()
            stream = await client.chat.completions.create(
                model=MODEL,
                max_tokens=200,
                stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": PROMPT.format(ticket_id=f"T-{i}")}],
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(runs)))
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed, latencies


def tailrace_batch(root: str, runs: int, concurrency: int, out: str) -> tuple[float, list[float]]:
    from tailrace.cluster.api import run_batch

    latencies: list[float] = []
    t0 = time.perf_counter()
    summary = run_batch(
        WORKFLOW,
        ({"ticket_id": f"T-{i}", "id": f"r{i}"} for i in range(runs)),
        options=RunOptions(deadline_s=60),
        out=out,
        simulator=SimulatorEndpoints(root + "/v1", root),
        max_in_flight=concurrency,
        on_done=lambda o: latencies.append(o.latency_s),
    )
    elapsed = time.perf_counter() - t0
    assert summary.delivered == runs, summary.failures
    return elapsed, latencies


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--big", type=int, default=10_000, help="runs in the memory check (0 to skip)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    with simulator_process("clean", seed=1, time_scale=1e-6) as root, tempfile.TemporaryDirectory() as tmp:
        tailrace_batch(root, 200, args.concurrency, f"{tmp}/warm.jsonl")  # warm imports, workers, connections
        asyncio.run(bare_loop(root, 200, args.concurrency))
        bare_s, bare_lat = asyncio.run(bare_loop(root, args.runs, args.concurrency))
        tr_s, tr_lat = tailrace_batch(root, args.runs, args.concurrency, f"{tmp}/small.jsonl")
        rows = [("bare asyncio + SDK", args.runs / bare_s, bare_lat), ("tailrace on Ray", args.runs / tr_s, tr_lat)]
        print(f"\n{args.runs} single-step runs, concurrency {args.concurrency}, zero simulated latency\n")
        print("| contender | steps/s | p50 ms | p90 ms | p99 ms |")
        print("|---|---:|---:|---:|---:|")
        for name, rate, lat in rows:
            print(
                f"| {name} | {rate:.0f} | {pct(lat, 0.5) * 1e3:.1f} | {pct(lat, 0.9) * 1e3:.1f} | "
                f"{pct(lat, 0.99) * 1e3:.1f} |"
            )
        print(f"\nthroughput ratio tailrace / bare: {rows[1][1] / rows[0][1]:.2f}x (goal >= 0.5x)")
        print(f"added latency per step (p50): {(statistics.median(tr_lat) - statistics.median(bare_lat)) * 1e3:.1f} ms")
        if args.big:
            before = peak_rss_mib()
            t0 = time.perf_counter()
            tailrace_batch(root, args.big, args.concurrency, f"{tmp}/big.jsonl")
            size_mib = Path(f"{tmp}/big.jsonl").stat().st_size / 2**20
            print(
                f"\ndriver peak RSS: {before:.0f} MiB after {args.runs} runs, {peak_rss_mib():.0f} MiB after "
                f"{args.big} more runs ({time.perf_counter() - t0:.0f} s; {size_mib:.1f} MiB of results on disk)"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
