"""TPM adherence: tailrace's cluster budget vs per-process limiting, same workload, same simulator.

Offered load is 3x the simulator's TPM limit, bursty (each tenant's arrivals come in 2 s bursts, out
of phase), from two tenants with weights 2:1. Each contender gets a fresh simulator (`tpm` scenario,
which rejects overruns with 429) and the same arrival times:

* **tailrace budget**: every attempt reserves from the budget actor's ledger through a lease; runs
  that cannot get their tokens before their deadline are refused at submission.
* **per-process limiting** (what a user would do without a global budget): each of the N executors
  limits itself to limit/N with a local token bucket charged at admission (prompt + max_tokens, as the
  provider charges) and waits for tokens until the run's deadline; no admission control.

Prints, per contender: 429s caused by overrun, utilisation of the limit (tokens the simulator charged
during the arrival window / what the limit allows in it, burst included), admitted runs' deadline
hit rate, and how fast refused runs were refused.

    python benchmarks/tpm.py [--seconds 40] [--time-scale 0.2] [--executors 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _sim_process import simulator_process

from tailrace.engine.clock import SYSTEM_CLOCK, Deadline
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import FailureReason, RunOutcome
from tailrace.engine.specs import RunOptions
from tailrace.policies.buckets import TokenBucket
from tailrace.policies.budget_config import BudgetConfig, LimitSpec, TenantBudget, reserve_amount
from tailrace.policies.spend import Grant, Refusal, SpendAsk, Usage

SIM_TPM = 100_000  # the `tpm` scenario's limit, per simulated minute, per API key
WEIGHTS = {"gold": 2.0, "std": 1.0}
STEP = {
    "models": [
        {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "max_tokens": 160,
            "input_usd_per_mtok": 0.15,
            "output_usd_per_mtok": 0.6,
            "expected_ttft_s": 0.15,
            "expected_latency_s": 0.35,
        }
    ]
}
WORKFLOW = workflow_from_dict(
    {
        "name": "tpm_bench",
        "inputs": ["ticket_id", "message"],
        "steps": [
            {
                "id": "triage",
                "prompt": "Triage ticket {{input.ticket_id}}: {{input.message}}",
                **STEP,
                "output": {"copy_ids": ["ticket_id"]},
            },
            {
                "id": "reply",
                "depends_on": ["triage"],
                "prompt": "Reply to the customer, given: {{steps.triage}}",
                **STEP,
            },
        ],
    }
)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- the per-process baseline: a local token bucket per executor, limit / N each ------------------


class _LocalBucketGate:
    """What a user would write: a local token bucket (aiolimiter-style), charged prompt + max_tokens,
    waiting for tokens until the run's deadline."""

    def __init__(self, config: BudgetConfig, share: float) -> None:
        self._config = config
        self._share = share
        self._buckets: dict[str, TokenBucket] = {}
        self._lock: asyncio.Lock | None = None

    def gate(self) -> Any:
        return self

    def snapshot(self) -> dict[str, Any]:
        return {"mode": "per-process"}

    async def aclose(self) -> None:
        return None

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        now = SYSTEM_CLOCK.monotonic()
        deadline = Deadline(ask.deadline_at, SYSTEM_CLOCK)
        specs = self._config.buckets_for(ask.provider, ask.model)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # FIFO: first come, first served
            for spec in specs:
                if spec.key not in self._buckets:
                    self._buckets[spec.key] = TokenBucket.full(
                        spec.capacity * self._share, spec.rate_per_s * self._share, now
                    )
            while True:
                now = SYSTEM_CLOCK.monotonic()
                waits = [self._buckets[s.key].seconds_until(reserve_amount(s, ask), now) for s in specs]
                wait = max(waits, default=0.0)
                if wait <= 0:
                    for s in specs:
                        b = self._buckets[s.key]
                        b.take(reserve_amount(s, ask), now)
                        b.spend(reserve_amount(s, ask), now)
                    return Grant(ask)
                if wait > deadline.remaining():
                    return Refusal("budget_exhausted: the local limiter has no tokens before the deadline")
                await asyncio.sleep(min(wait, 0.05))

    async def settle(self, grant: Grant, used: Usage) -> None:
        return None  # charged at admission, as the provider does


@dataclass(frozen=True)
class PerProcessLimit:
    """Passed to executors where a `BudgetHandle` would go."""

    config: BudgetConfig
    executors: int

    def executor_gate(self, executor_id: str) -> _LocalBucketGate:
        return _LocalBucketGate(self.config, 1.0 / self.executors)


# ---- workload ---------------------------------------------------------------------------------------


def arrivals(seconds: float, runs_per_s: float, seed: int) -> list[tuple[float, str]]:
    """Poisson arrivals per tenant, in 2 s bursts every 4 s (on at twice the mean rate); the tenants'
    bursts overlap by half."""
    rng = random.Random(seed)
    out = []
    for tenant, phase in (("gold", 0.0), ("std", 1.0)):
        t = 0.0
        mean = runs_per_s / 2
        while t < seconds:
            t += rng.expovariate(2 * mean)
            if t < seconds and ((t + phase) % 4.0) < 2.0:
                out.append((t, tenant))
    return sorted(out)


def refused(o: RunOutcome) -> bool:
    return o.failure == FailureReason.BUDGET_EXHAUSTED and "at submission" in (o.detail or "")


@dataclass
class Result:
    name: str
    outcomes: list[RunOutcome] = field(default_factory=list)
    refusal_latency_s: list[float] = field(default_factory=list)  # scheduled arrival -> refused
    overrun_429: int = 0
    other_429: int = 0
    charged_in_window: float = 0.0
    allowed_in_window: float = 0.0
    elapsed_s: float = 0.0


async def drive(drivers: dict[str, Any], plan: list[tuple[float, str]], msgs: list[str], result: Result) -> None:
    t0 = time.monotonic()
    tasks = []

    async def one(i: int, at: float, tenant: str) -> None:
        record = {"ticket_id": f"T-{i:06d}", "message": msgs[i % len(msgs)]}
        outcome = await drivers[tenant].run(f"{tenant}-{i}", record)
        result.outcomes.append(outcome)
        if refused(outcome):
            result.refusal_latency_s.append(time.monotonic() - (t0 + at))

    for i, (at, tenant) in enumerate(plan):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, at, tenant)))
    await asyncio.gather(*tasks)


def run_contender(
    name: str,
    plan: list[tuple[float, str]],
    seconds: float,
    time_scale: float,
    executors: int,
    seed: int,
    deadline_s: float,
    tmp: str,
) -> Result:
    import ray

    from tailrace.actors.budget_actor import find_budget_actor
    from tailrace.cluster.api import start_executors
    from tailrace.cluster.budget import BudgetAdmission, ensure_budget
    from tailrace.cluster.driver import WorkflowDriver
    from tailrace.cluster.providers import SimulatorEndpoints, resolve_providers

    window_s = 60 * time_scale
    config = BudgetConfig(
        limits=[LimitSpec(account="sim", tpm=SIM_TPM)],
        accounts={"openai": "sim"},
        window_s=window_s,
        tenants={t: TenantBudget(weight=w) for t, w in WEIGHTS.items()},
        actor_name=f"bench-{name}-{os.getpid()}",
    )
    log = f"{tmp}/{name}.jsonl"
    result = Result(name)
    msgs = [
        ("My order arrived damaged and I would like a replacement or a refund, please. " * 2)[: 80 + 7 * k]
        for k in range(10)
    ]
    with simulator_process("tpm", seed=seed, time_scale=time_scale, log=log) as root:
        providers = resolve_providers(WORKFLOW, SimulatorEndpoints(root + "/v1", root))
        if name == "tailrace":
            handle = ensure_budget(config, WORKFLOW)
            pool = start_executors(providers, executors, budget=handle)
            admission = BudgetAdmission(handle.config, WORKFLOW, handle.actor)
        else:
            pool = start_executors(
                providers, executors, budget=PerProcessLimit(config.for_workflow(WORKFLOW), executors)
            )
            admission = None
        drivers = {
            t: WorkflowDriver(WORKFLOW, RunOptions(deadline_s=deadline_s, tenant=t), pool, admission=admission)
            for t in WEIGHTS
        }
        started = time.time()
        t0 = time.monotonic()
        asyncio.run(drive(drivers, plan, msgs, result))
        result.elapsed_s = time.monotonic() - t0
        ray.get([e.shutdown.remote() for e in pool], timeout=30)
        for e in pool:
            ray.kill(e)
        actor = find_budget_actor(config.actor_name)
        if actor is not None:
            ray.kill(actor)
    rate = SIM_TPM / window_s
    for line in Path(log).read_text().splitlines():
        r = json.loads(line)
        if r["status"] == 429:
            if r.get("limited") in ("tokens", "requests"):
                result.overrun_429 += 1
            else:
                result.other_429 += 1
            continue
        arrived = r["ts"] - r["duration_s"] - started
        if 0 <= arrived <= seconds:
            result.charged_in_window += r["input_tokens"] + 160  # charged at admission: prompt + max_tokens
    result.allowed_in_window = SIM_TPM + rate * seconds
    return result


def report(results: list[Result], seconds: float, offered_runs: int, rate: float) -> None:
    delivered = [o for r in results for o in r.outcomes if o.delivered and len(o.attempts) == 2]
    per_run = sum(a.input_tokens + 160 for o in delivered for a in o.attempts) / max(1, len(delivered))
    print(
        f"\n{seconds:.0f} s of bursty arrivals ({offered_runs} runs) from two tenants (weights gold 2 : std 1), "
        f"offered {offered_runs * per_run / seconds / rate:.1f}x the limit ({rate:,.0f} tokens/s; "
        f"a run is charged {per_run:.0f} tokens)\n"
    )
    print(
        "| contender | runs | refused at submission | admitted | admitted on time | hit rate (admitted) | "
        "delivered on time (all runs) | overrun 429s | utilisation | refusal ms p50 / p99 / max "
        "(in the driver) | (from scheduled arrival) | gold:std tokens |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        no = [o for o in r.outcomes if refused(o)]
        admitted = [o for o in r.outcomes if not refused(o)]
        on_time = sum(o.on_time for o in admitted)
        tokens = {t: sum(a.input_tokens + 160 for o in admitted if o.tenant == t for a in o.attempts) for t in WEIGHTS}
        cells = []
        for lat in ([o.latency_s for o in no], r.refusal_latency_s):
            cells.append(
                f"{pct(lat, 0.5) * 1e3:.2f} / {pct(lat, 0.99) * 1e3:.2f} / {max(lat) * 1e3:.1f}" if lat else "-"
            )
        print(
            f"| {r.name} | {len(r.outcomes)} | {len(no)} | {len(admitted)} | {on_time} | "
            f"{on_time / max(1, len(admitted)):.1%} | {on_time / max(1, len(r.outcomes)):.1%} | {r.overrun_429} | "
            f"{r.charged_in_window / r.allowed_in_window:.1%} | {cells[0]} | {cells[1]} | "
            f"{tokens['gold'] / max(1, tokens['std']):.2f} |"
        )
    print(
        "\nGoals (tailrace): overrun 429s = 0, utilisation >= 90%, hit rate of admitted runs >= 99%, "
        "refused within 50 ms."
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the arrival window")
    parser.add_argument("--time-scale", type=float, default=0.2, help="simulator time scale")
    parser.add_argument("--executors", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=4.0, help="per-run deadline, seconds")
    parser.add_argument("--load", type=float, default=3.0, help="offered load, multiple of the limit")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", choices=["tailrace", "per-process"], help="run one contender")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    rate = SIM_TPM / (60 * args.time_scale)
    # Two attempts of prompt + max_tokens 160: ~50 and ~110 prompt tokens (the reply quotes the triage).
    tokens_per_run = 2 * 160 + 160
    plan = arrivals(args.seconds, args.load * rate / tokens_per_run, args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tailrace", "per-process"):
            if args.only and name != args.only:
                continue
            results.append(
                run_contender(name, plan, args.seconds, args.time_scale, args.executors, args.seed, args.deadline, tmp)
            )
    report(results, args.seconds, len(plan), rate)
    ray.shutdown()


if __name__ == "__main__":
    main()
