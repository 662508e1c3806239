"""What tailrace adds to a provider's own latency, side by side in one run: the online engine per
request, and batches.

The simulator runs in its own process with zero simulated latency, so what is measured is the cost of
the path, not of a model. Every contender streams the same single-step request through the same
`openai` SDK:

1. online, one request at a time: a bare `openai.AsyncOpenAI` call vs `await engine.run(...)` on a
   started `Engine` (2 executors), interleaved in blocks so drift in the machine's load hits both;
   the added latency at p50 is the engine's overhead per run (goal: <= 5 ms);
2. online, many at once: the same at concurrency C (steps/s and latency percentiles);
3. a batch: `run_batch` vs a bare asyncio loop at concurrency C, then the driver's peak RSS across a
   10,000-run batch (results stream to disk, so it must stay flat);
4. start-up: one trivial `run_batch` call (starts executors each call) vs one `engine.run` on a
   started engine.

    python benchmarks/overhead.py [--online 600] [--runs 2000] [--concurrency 32] [--big 10000]
"""

from __future__ import annotations

import argparse
import asyncio
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

from tailrace import BatchConfig, Engine, EngineConfig, PoolConfig, RunOptions, run_batch
from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.engine.loading import workflow_from_dict

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
        "defaults": {"deadline_s": 60},
    }
)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def row(name: str, latencies: list[float], rate: float | None = None) -> str:
    ms = [x * 1e3 for x in latencies]
    rate_text = f"{rate:.0f}" if rate is not None else "-"
    return f"| {name} | {rate_text} | {pct(ms, 0.5):.1f} | {pct(ms, 0.9):.1f} | {pct(ms, 0.99):.1f} |"


async def bare_call(client: openai.AsyncOpenAI, i: int) -> float:
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
    return time.perf_counter() - t0


async def engine_call(engine: Engine, i: int) -> float:
    t0 = time.perf_counter()
    outcome = await engine.run(WORKFLOW, {"ticket_id": f"T-{i}"})
    assert outcome.delivered, outcome.detail
    return time.perf_counter() - t0


async def online(root: str, n: int, concurrency: int) -> None:
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="bench", max_retries=0)
    endpoints = SimulatorEndpoints(root + "/v1", root)
    started = time.perf_counter()
    async with Engine(EngineConfig(pool=PoolConfig.fixed(2)), workflows=[WORKFLOW], providers=endpoints) as engine:
        start_s = time.perf_counter() - started
        for i in range(100):  # warm: imports, connections, latency windows
            await bare_call(client, i)
            await engine_call(engine, i)
        first = await engine_call(engine, 0)
        bare: list[float] = []
        tailrace: list[float] = []
        block = 50
        for start in range(0, n, block):  # interleaved, so load drift hits both alike
            bare += [await bare_call(client, i) for i in range(start, start + block)]
            tailrace += [await engine_call(engine, i) for i in range(start, start + block)]
        print(f"\n## online, one request at a time ({len(bare)} each, interleaved in blocks of {block})\n")
        print("| contender | steps/s | p50 ms | p90 ms | p99 ms |\n|---|---:|---:|---:|---:|")
        print(row("bare asyncio + SDK", bare))
        print(row("engine.run (2 executors)", tailrace))
        added = (statistics.median(tailrace) - statistics.median(bare)) * 1e3
        print(f"\nadded latency per run at p50: **{added:.1f} ms** (goal <= 5 ms)")
        print(f"engine start-up: {start_s:.2f} s once; then one run: {first * 1e3:.1f} ms")

        gate = asyncio.Semaphore(concurrency)

        async def gated(call, *args):  # type: ignore[no-untyped-def]
            async with gate:
                return await call(*args)

        count = max(n, 10 * concurrency)
        t0 = time.perf_counter()
        bare_c = await asyncio.gather(*(gated(bare_call, client, i) for i in range(count)))
        bare_rate = count / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine_c = await asyncio.gather(*(gated(engine_call, engine, i) for i in range(count)))
        engine_rate = count / (time.perf_counter() - t0)
        print(f"\n## online, {concurrency} at once ({count} each)\n")
        print("| contender | steps/s | p50 ms | p90 ms | p99 ms |\n|---|---:|---:|---:|---:|")
        print(row("bare asyncio + SDK", bare_c, bare_rate))
        print(row("engine.run (2 executors)", engine_c, engine_rate))
        print(f"\nthroughput ratio engine / bare: {engine_rate / bare_rate:.2f}x")
    await client.close()


async def bare_loop(root: str, runs: int, concurrency: int) -> tuple[float, list[float]]:
    client = openai.AsyncOpenAI(base_url=root + "/v1", api_key="bench", max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> float:
        async with gate:
            return await bare_call(client, i)

    t0 = time.perf_counter()
    latencies = await asyncio.gather(*(one(i) for i in range(runs)))
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed, list(latencies)


def tailrace_batch(root: str, runs: int, concurrency: int, out: str) -> tuple[float, list[float]]:
    latencies: list[float] = []
    t0 = time.perf_counter()
    summary = run_batch(
        WORKFLOW,
        ({"ticket_id": f"T-{i}", "id": f"r{i}"} for i in range(runs)),
        options=RunOptions(deadline_s=60),
        out=out,
        config=BatchConfig(max_in_flight=concurrency),
        providers=SimulatorEndpoints(root + "/v1", root),
        on_done=lambda o: latencies.append(o.latency_s),
    )
    elapsed = time.perf_counter() - t0
    assert summary.delivered == runs, summary.failures
    return elapsed, latencies


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--online", type=int, default=600, help="one-at-a-time runs per contender")
    parser.add_argument("--runs", type=int, default=2000, help="runs per contender in the batch comparison")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--big", type=int, default=10_000, help="runs in the memory check (0 to skip)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from tailrace.cluster.connection import connect

    connect("local", num_cpus=2)  # a cluster of its own, even if `ray start` left one on this machine
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores)")
    with simulator_process("clean", seed=1, time_scale=1e-6) as root, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(online(root, args.online, args.concurrency))

        t0 = time.perf_counter()
        tailrace_batch(root, 1, 1, f"{tmp}/one.jsonl")
        print(f"\none trivial run_batch call (starts and stops its executors): {time.perf_counter() - t0:.2f} s")

        tailrace_batch(root, 200, args.concurrency, f"{tmp}/warm.jsonl")  # warm imports, workers, connections
        asyncio.run(bare_loop(root, 200, args.concurrency))
        bare_s, bare_lat = asyncio.run(bare_loop(root, args.runs, args.concurrency))
        tr_s, tr_lat = tailrace_batch(root, args.runs, args.concurrency, f"{tmp}/small.jsonl")
        print(f"\n## a batch: {args.runs} single-step runs, concurrency {args.concurrency}\n")
        print("| contender | steps/s | p50 ms | p90 ms | p99 ms |\n|---|---:|---:|---:|---:|")
        print(row("bare asyncio + SDK", bare_lat, args.runs / bare_s))
        print(row("run_batch on Ray", tr_lat, args.runs / tr_s))
        print(f"\nthroughput ratio run_batch / bare: {(args.runs / tr_s) / (args.runs / bare_s):.2f}x (goal >= 0.5x)")
        if args.big:
            before = peak_rss_mib()
            t0 = time.perf_counter()
            tailrace_batch(root, args.big, args.concurrency, f"{tmp}/big.jsonl")
            size_mib = Path(f"{tmp}/big.jsonl").stat().st_size / 2**20
            print(
                f"\ndriver peak RSS: {before:.0f} MiB before, {peak_rss_mib():.0f} MiB after {args.big} more runs "
                f"({time.perf_counter() - t0:.0f} s; {size_mib:.1f} MiB of results on disk)"
            )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
