"""The step runner with a budget gate, over real HTTP to the simulator: a duplicate refused for lack of
spare capacity is asked again later, not in a busy loop; a step waiting for budget stops when its run
stops; every attempt is settled with the ledger."""

from __future__ import annotations

import asyncio
import time

from tailrace.engine.clock import SYSTEM_CLOCK, RunDeadline
from tailrace.engine.outcomes import FailureReason
from tailrace.engine.providers.base import AdapterSettings, build_adapter
from tailrace.engine.specs import StepSpec
from tailrace.policies.attempts import GiveUp, Start
from tailrace.policies.budget_config import BudgetConfig, LimitSpec
from tailrace.policies.spend import RunCostGate
from tailrace.runtime.budget_ledger import MemoryLedger
from tailrace.runtime.direct_gate import ComposedGate
from tailrace.runtime.lease_gate import LeasePool, LocalLedgerClient
from tailrace.runtime.step_runner import RunStop, StepRequest, StepRunner

STEP = StepSpec(
    id="s",
    prompt="Say something about T-1.",
    models=[{"provider": "openai", "model": "gpt-4o-mini", "max_tokens": 100}],
)
KEY = "tokens:sim:*"


class PrimaryThenDuplicates:
    """Starts a primary, then asks for a duplicate at once, for as long as the primary runs."""

    def __init__(self) -> None:
        self.asked = 0

    def decide(self, attempts, now, deadline):
        if not attempts:
            return Start(0, now, "primary")
        if any(a.running for a in attempts):
            self.asked += 1
            return Start(0, now, "duplicate")
        return GiveUp(FailureReason.INVALID_OUTPUT, "done")


def runner(sim, pool: LeasePool, policy) -> StepRunner:
    adapters = {"openai": build_adapter(AdapterSettings("openai", sim.openai_base_url, api_key="k"), SYSTEM_CLOCK)}
    return StepRunner(
        adapters,
        policy_factory=lambda req: policy,
        gate_factory=lambda req: ComposedGate([RunCostGate(None), pool.gate()]),
    )


def request(deadline_s: float) -> StepRequest:
    return StepRequest(
        run_id="r",
        workflow="w",
        tenant="t",
        step=STEP,
        inputs={},
        upstream={},
        deadline=RunDeadline(SYSTEM_CLOCK.time() + deadline_s),
    )


def config(tpm: int, spare: float) -> BudgetConfig:
    return BudgetConfig(
        limits=[LimitSpec(account="sim", tpm=tpm)],
        accounts={"openai": "sim"},
        provider_kinds={"openai": "openai"},
        spare_fraction=spare,
    )


async def test_a_refused_duplicate_is_asked_again_later_not_in_a_busy_loop(simulator):
    sim = simulator("clean", seed=1, time_scale=0.5)  # a ~1 s attempt
    ledger = MemoryLedger(config(60_000, 1.0).bucket)
    pool = LeasePool(config(60_000, 1.0), LocalLedgerClient(ledger), "e1")  # spare 100%: never any
    policy = PrimaryThenDuplicates()
    t0 = time.monotonic()
    result = await runner(sim, pool, policy).run(request(20.0))
    elapsed = time.monotonic() - t0
    assert result.ok and [a.role for a in result.attempts] == ["primary"]
    assert policy.asked <= elapsed / 0.1 + 2, f"asked {policy.asked} times in {elapsed:.2f} s"
    assert pool.counters.refused_total["no_spare_capacity"] >= 1
    await pool.aclose()
    assert ledger.book.buckets[KEY].outstanding == 0  # settled and returned


async def test_waiting_for_budget_ends_when_the_run_stops(simulator):
    sim = simulator("clean", seed=1, time_scale=0.05)
    cfg = config(600, 0.25)  # 10 tokens/s
    ledger = MemoryLedger(cfg.bucket, start_full=False)
    pool = LeasePool(cfg, LocalLedgerClient(ledger), "e1")
    policy = PrimaryThenDuplicates()
    stop = RunStop()
    task = asyncio.ensure_future(runner(sim, pool, policy).run(request(30.0), stop))
    await asyncio.sleep(0.3)
    assert not task.done()  # waiting for ~150 tokens at 10/s
    stop.set()
    result = await asyncio.wait_for(task, 2.0)
    assert not result.ok and result.failure == FailureReason.CANCELLED
    assert "stopped while waiting" in result.detail
    assert len(pool.queue) == 0
    assert sim.log_records() == []  # nothing was sent
    await pool.aclose()
