"""Reservation throughput: leases vs one budget-actor call per attempt, side by side.

N client actors (stand-ins for step executors) reserve and settle as fast as they can for a few
seconds against one budget actor, with limits high enough never to bind, so what is measured is the
cost of asking. Lease mode: a reservation is served from the executor's lease (a local subtraction);
the lease is topped up and spend reported every `flush_interval_s`. Direct mode: each reservation and
each settlement is a call to the budget actor.

    python benchmarks/reservations.py [--seconds 5] [--clients 4] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when ray is imported

import ray

from tailrace.engine.clock import SYSTEM_CLOCK
from tailrace.policies.budget_config import BudgetConfig, LimitSpec
from tailrace.policies.spend import Grant, SpendAsk, Usage


@ray.remote(num_cpus=0)
class Client:
    def __init__(self, handle, name: str) -> None:  # type: ignore[no-untyped-def]
        self._gate = handle.executor_gate(name)

    async def close(self) -> None:
        await self._gate.aclose()

    async def run(self, seconds: float, concurrency: int) -> dict[str, float]:
        gate = self._gate.gate()
        count = refused = 0
        stop_at = time.monotonic() + seconds

        async def worker(i: int) -> None:
            nonlocal count, refused
            ask = SpendAsk(
                run_id=f"r{i}",
                step_id="s",
                tenant="t",
                provider="openai",
                model="m",
                role="primary",
                input_tokens=100,
                max_output_tokens=200,
                cost_usd=0.0001,
                deadline_at=SYSTEM_CLOCK.monotonic() + 3600,
            )
            used = Usage(90, 50, 0.00005)
            while time.monotonic() < stop_at:
                grant = await gate.reserve(ask)
                if isinstance(grant, Grant):
                    await gate.settle(grant, used)
                    count += 1
                else:
                    refused += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - t0
        return {"reservations": count, "refused": refused, "seconds": elapsed}


def measure(mode: str, clients: int, seconds: float, concurrency: int) -> tuple[float, int, int]:
    from tailrace.actors.budget_actor import BudgetHandle, budget_actor

    config = BudgetConfig(
        limits=[LimitSpec(account="acct", tpm=10**12, rpm=10**12)],
        accounts={"openai": "acct"},
        provider_kinds={"openai": "openai"},
        mode=mode,
        actor_name=f"bench-reserve-{mode}-{os.getpid()}",
    )
    actor = budget_actor(config)
    handle = BudgetHandle(config, actor)
    workers = [Client.remote(handle, f"{mode}-{i}") for i in range(clients)]
    ray.get([w.run.remote(0.3, 4) for w in workers])  # warm up: imports, first lease
    t0 = time.monotonic()
    results = ray.get([w.run.remote(seconds, concurrency) for w in workers])
    wall = time.monotonic() - t0
    exchanges = ray.get(actor.health.remote())["exchanges"]
    ray.get([w.close.remote() for w in workers])
    for w in workers:
        ray.kill(w)
    ray.kill(actor)
    total = sum(int(r["reservations"]) for r in results)
    return total / wall, total, exchanges


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4, help="executor stand-ins (actors)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent attempts per client")
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    rows = []
    for mode in ("lease", "direct"):
        rate, total, exchanges = measure(mode, args.clients, args.seconds, args.concurrency)

        rows.append((mode, rate, total, exchanges))
    print(
        f"\n{args.clients} clients x {args.concurrency} concurrent attempts, {args.seconds:.0f} s, "
        f"one budget actor, {os.cpu_count()} cores\n"
    )
    print("| mode | reservations/s (cluster) | reservations | budget-actor calls | calls per reservation |")
    print("|---|---:|---:|---:|---:|")
    for mode, rate, total, exchanges in rows:
        label = "leases (local, topped up in the background)" if mode == "lease" else "one actor call per attempt"
        print(f"| {label} | {rate:,.0f} | {total:,} | {exchanges:,} | {exchanges / max(1, total):.3f} |")
    print(f"\nleases / direct: {rows[0][1] / rows[1][1]:.0f}x (goal: >= 20,000 reservations/s with leases)")
    ray.shutdown()


if __name__ == "__main__":
    main()
