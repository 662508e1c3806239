"""The executor's lease pool on fake time against the real in-memory ledger (no Ray): grants served
locally, spend reported, priority under contention, fail-fast refusals, idle return, dead executors,
provider feedback, conservative settlement of cancelled attempts."""

from __future__ import annotations

import asyncio

import pytest

from tailrace.engine.clock import FakeClock
from tailrace.policies.budget_config import BudgetConfig, LimitSpec, TenantBudget
from tailrace.policies.spend import Grant, Refusal, RunCostGate, SpendAsk, Usage
from tailrace.runtime.budget_ledger import MemoryLedger
from tailrace.runtime.direct_gate import ComposedGate, DirectGate
from tailrace.runtime.lease_gate import LeasePool, LocalLedgerClient

KEY = "tokens:sim:*"
RPM = "requests:sim:*"


def config(**kw) -> BudgetConfig:
    base = dict(
        limits=[LimitSpec(account="sim", tpm=6000, rpm=600)],
        accounts={"openai": "sim"},
        provider_kinds={"openai": "openai"},
        tenants={"gold": TenantBudget(weight=2.0)},
        flush_interval_s=0.05,
        lease_ttl_s=1.0,
        idle_release_s=0.5,
    )
    return BudgetConfig(**{**base, **kw})


def ask(
    clock: FakeClock,
    tokens: int = 100,
    role: str = "primary",
    tenant: str = "std",
    deadline_in: float = 30.0,
    cost: float = 0.001,
) -> SpendAsk:
    return SpendAsk(
        run_id="r",
        step_id="s",
        tenant=tenant,
        provider="openai",
        model="m",
        role=role,
        input_tokens=tokens // 2,
        max_output_tokens=tokens - tokens // 2,
        cost_usd=cost,
        deadline_at=clock.monotonic() + deadline_in,
    )


async def settle_loop(n: int = 30) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def tick(clock: FakeClock, seconds: float, step: float = 0.01) -> None:
    t = 0.0
    while t < seconds - 1e-12:
        clock.advance(step)
        t += step
        await settle_loop()


def setup(cfg: BudgetConfig | None = None, start_full: bool = True):
    cfg = cfg or config()
    clock = FakeClock()
    ledger = MemoryLedger(cfg.bucket, start_full=start_full)
    pool = LeasePool(cfg, LocalLedgerClient(ledger, clock), "ex1", clock)
    return cfg, clock, ledger, pool


async def reserve(pool, a: SpendAsk, clock: FakeClock, within: float = 2.0) -> Grant | Refusal:
    task = asyncio.ensure_future(pool.reserve(a))
    await settle_loop()
    waited = 0.0
    while not task.done() and waited < within:
        await tick(clock, 0.01)
        waited += 0.01
    return task.result()


async def test_reservations_are_served_from_the_lease_not_one_ledger_call_each():
    _, clock, ledger, pool = setup(config(limits=[LimitSpec(account="sim", tpm=600_000, rpm=60_000)]))
    granted = 0
    for i in range(400):  # 400 reservations over 2 s of fake time
        g = await reserve(pool, ask(clock, tokens=20), clock)
        granted += isinstance(g, Grant)
        await pool.settle(g, Usage(10, 10, 0.0))
        if i % 2:
            await tick(clock, 0.01)
    assert granted == 400
    calls = len(ledger.book._replies)
    assert calls < 400 / 5, f"{calls} ledger calls for 400 reservations"
    await pool.aclose()


async def test_spend_is_reported_refunds_come_back_and_idle_lease_is_returned():
    _, clock, ledger, pool = setup()
    g = await reserve(pool, ask(clock, tokens=400), clock)
    # The provider corrects the window to use: our prompt over-estimate (200 -> 150) and the unused
    # output (200 -> 20) come back.
    await pool.settle(g, Usage(input_tokens=150, output_tokens=20, cost_usd=0.0005))
    await tick(clock, 0.2)
    bucket = ledger.book.buckets[KEY]
    assert bucket.spent_total == pytest.approx(170)
    await tick(clock, 1.0)  # idle for longer than idle_release_s: the lease goes back
    assert pool.lease_id is None
    assert bucket.outstanding == 0 and not ledger.book.leases
    status = await ledger.status(next(iter(ledger.book.spend))[0], clock.time())
    assert status.spend["std"].attempts == 1 and status.spend["std"].usd == pytest.approx(0.0005)


async def test_never_grantable_before_the_deadline_is_refused_at_once():
    _, clock, _ledger, pool = setup(start_full=False)  # dry bucket: 100 tokens/s
    await reserve(pool, ask(clock, tokens=10), clock)  # get a lease and a view of the ledger
    task = asyncio.ensure_future(pool.reserve(ask(clock, tokens=3000, deadline_in=5.0)))
    await settle_loop()
    assert task.done(), "refused without waiting"
    refusal = task.result()
    assert isinstance(refusal, Refusal) and refusal.reason.startswith("budget_exhausted")
    # Larger than the whole limit: refused whatever the deadline.
    too_big = await pool.reserve(ask(clock, tokens=7000, deadline_in=3600))
    assert isinstance(too_big, Refusal) and "more than the whole limit" in too_big.reason
    await pool.aclose()


async def test_without_admission_waiting_primaries_are_served_edf_and_2_to_1_between_tenants():
    _cfg, clock, _ledger, pool = setup(config(admission=False), start_full=False)
    await reserve(pool, ask(clock, tokens=5), clock)
    order: list[tuple[str, float]] = []

    async def one(tenant: str, deadline: float) -> None:
        g = await pool.reserve(ask(clock, tokens=50, tenant=tenant, deadline_in=deadline))
        if isinstance(g, Grant):
            order.append((tenant, deadline))

    tasks = [asyncio.ensure_future(one(t, 100.0 + i)) for i in range(40) for t in ("gold", "std")]
    tasks += [asyncio.ensure_future(one("std", 50.0 + i)) for i in range(3)]
    await tick(clock, 10.0, step=0.05)
    served = order[:30]
    gold = sum(1 for t, _ in served if t == "gold")
    assert gold / (len(served) - gold) == pytest.approx(2.0, abs=0.35)
    std = [d for t, d in order if t == "std"]
    assert std[:3] == [50.0, 51.0, 52.0] and std == sorted(std)  # EDF within the tenant
    for t in tasks:
        t.cancel()
    await settle_loop()
    await pool.aclose()


async def test_a_run_under_way_is_served_before_new_runs_first_steps():
    """Under contention, a later step of an admitted run goes ahead of every waiting first step, even
    ones with earlier deadlines: a run that dies half-way wasted its tokens."""
    _cfg, clock, _ledger, pool = setup(start_full=False)  # dry: 100 tokens/s
    await reserve(pool, ask(clock, tokens=5), clock)
    order: list[str] = []

    async def one(name: str, gate, tenant: str, deadline: float) -> None:
        g = await gate.reserve(ask(clock, tokens=50, tenant=tenant, deadline_in=deadline))
        if isinstance(g, Grant):
            order.append(name)

    first_steps, later_steps = pool.gate(continuing=False), pool.gate(continuing=True)
    tasks = [asyncio.ensure_future(one(f"new-{i}", first_steps, "std", 5.0 + i)) for i in range(20)]
    await settle_loop()
    tasks.append(asyncio.ensure_future(one("under-way", later_steps, "std", 30.0)))
    await tick(clock, 1.5, step=0.05)
    assert "under-way" in order and order.index("under-way") <= 1, order
    for t in tasks:
        t.cancel()
    await settle_loop()
    await pool.aclose()


async def test_duplicates_stop_first_near_the_ceiling():
    _, clock, ledger, pool = setup()
    g = await reserve(pool, ask(clock, tokens=100), clock)
    assert isinstance(g, Grant)
    dup = await pool.reserve(ask(clock, tokens=100, role="duplicate"))
    assert isinstance(dup, Grant), "plenty of spare capacity: a duplicate may run"
    # Drain the bucket to near its ceiling with other executors' leases.
    hog = LeasePool(config(), LocalLedgerClient(ledger, clock), "hog", clock)
    big = await reserve(hog, ask(clock, tokens=5000), clock)
    await hog.settle(big, Usage(2500, 2500, 0.0))
    await tick(clock, 0.2)
    dup = await pool.reserve(ask(clock, tokens=100, role="duplicate"))
    assert isinstance(dup, Refusal) and "spare" in dup.reason
    primary = await reserve(pool, ask(clock, tokens=100), clock)
    assert isinstance(primary, Grant), "a primary is still served"
    await pool.aclose()
    await hog.aclose()


async def test_a_dead_executors_lease_expires_and_the_limit_holds():
    cfg, clock, ledger, pool = setup()
    await reserve(pool, ask(clock, tokens=3000), clock)
    held = ledger.book.outstanding(KEY)
    assert held >= 3000
    pool.reporter.task.cancel()  # the executor dies: no more reports, no close
    await settle_loop()
    bucket = ledger.book.buckets[KEY]
    assert bucket.level + bucket.outstanding <= bucket.capacity + 1e-6
    other = LeasePool(cfg, LocalLedgerClient(ledger, clock), "ex2", clock)
    await reserve(other, ask(clock, tokens=50), clock)
    await tick(clock, cfg.lease_ttl_s + 0.2)
    ledger.book.expire(clock.time())
    assert all(lease.executor != "ex1" for lease in ledger.book.leases.values())
    assert bucket.written_off_total >= held - 1e-6
    await other.aclose()


async def test_a_429_blocks_the_bucket_for_retry_after_everywhere():
    _, clock, ledger, pool = setup()
    g = await reserve(pool, ask(clock), clock)
    await pool.settle(g, Usage(50, 0, 0.0, status=429, retry_after_s=2.0))
    await tick(clock, 0.1)
    bucket = ledger.book.buckets[KEY]
    assert bucket.blocked_until - clock.time() == pytest.approx(1.9, abs=0.05)
    task = asyncio.ensure_future(pool.reserve(ask(clock)))
    await tick(clock, 1.0)
    assert not task.done(), "waits out the Retry-After"
    await tick(clock, 1.5)
    assert isinstance(task.result(), Grant)
    await pool.aclose()


async def test_rate_limit_headers_lower_the_ledger_when_the_provider_has_less():
    _, clock, ledger, pool = setup()
    g = await reserve(pool, ask(clock), clock)
    await tick(clock, 0.1)
    # Someone else uses the key: the provider says only 1000 tokens are left.
    await pool.settle(g, Usage(50, 50, 0.0, rate_limit={"x-ratelimit-remaining-tokens": "1000"}))
    await tick(clock, 0.1)
    bucket = ledger.book.buckets[KEY]
    assert bucket.available(clock.time()) < 1100  # 1000, aged by the refill since the attempt
    assert bucket.clamped_total > 3000
    await pool.aclose()


async def test_cancelled_attempt_without_usage_settles_the_full_reservation():
    _cfg, clock, ledger, pool = setup()
    g = await reserve(pool, ask(clock, tokens=400), clock)
    await pool.settle(g, Usage(200, 0, 0.00003, reported=False, cancelled=True, valid=False))
    g2 = await pool.reserve(ask(clock, tokens=400))
    # 30 tokens received before the cancel: the provider may have produced more than arrived.
    await pool.settle(g2, Usage(200, 30, 0.00005, reported=False, cancelled=True, valid=False))
    await tick(clock, 0.2)
    assert ledger.book.buckets[KEY].spent_total == pytest.approx(400 + 400)
    day = next(iter(ledger.book.spend))[0]
    spend = ledger.book.spend[(day, "std")]
    assert spend.cancelled == 2
    # The tenant's spend is what the attempts' records say they cost, not the reservations.
    assert spend.usd == pytest.approx(0.00008) and spend.wasted_tokens == 200 + 230
    await pool.aclose()


async def test_daily_spend_allowance_refuses_when_spent():
    _cfg, clock, _ledger, pool = setup(cfg=config(tenants={"acme": TenantBudget(daily_usd=0.01)}))
    grants = []
    for _ in range(3):
        g = await reserve(pool, ask(clock, tenant="acme", cost=0.003), clock)
        assert isinstance(g, Grant)
        grants.append(g)
    refused = await reserve(pool, ask(clock, tenant="acme", cost=0.003), clock)
    assert isinstance(refused, Refusal) and refused.reason.startswith("budget_exhausted")
    await pool.settle(grants[0], Usage(10, 10, 0.0001))  # cheaper than reserved: room again
    await tick(clock, 0.2)
    assert isinstance(await reserve(pool, ask(clock, tenant="acme", cost=0.003), clock), Grant)
    await pool.aclose()


async def test_composed_gate_undoes_the_cost_cap_when_the_budget_refuses():
    _, clock, _ledger, pool = setup(start_full=False)
    cost = RunCostGate(0.01)
    gate = ComposedGate([cost, pool.gate()])
    refusal = await reserve(gate, ask(clock, tokens=5000, deadline_in=0.5, cost=0.004), clock)
    assert isinstance(refusal, Refusal)
    assert cost._remaining == pytest.approx(0.01)
    await pool.aclose()


async def test_direct_gate_one_call_per_attempt():
    cfg = config(mode="direct")
    clock = FakeClock()
    ledger = MemoryLedger(cfg.bucket)
    gate = DirectGate(cfg, LocalLedgerClient(ledger, clock), "d1", clock)
    g = await gate.reserve(ask(clock, tokens=400))
    assert isinstance(g, Grant)
    assert ledger.book.outstanding(KEY) == 400
    await gate.settle(g, Usage(150, 20, 0.0005))
    assert ledger.book.outstanding(KEY) == 0
    assert ledger.book.buckets[KEY].spent_total == pytest.approx(170)
    assert isinstance(await gate.reserve(ask(clock, tokens=7000)), Refusal)


class _Gone:
    """A ledger that stopped answering (its actor died and nobody could replace it)."""

    async def exchange(self, req):
        from tailrace.runtime.budget_ledger import LedgerUnavailable

        raise LedgerUnavailable("budget actor unavailable (ActorDiedError)")


async def test_once_no_budget_can_be_had_reservations_are_refused_at_once_saying_why():
    cfg = config(ledger_timeout_s=4.0)
    clock = FakeClock()
    ledger = MemoryLedger(cfg.bucket)
    pool = LeasePool(cfg, LocalLedgerClient(ledger, clock), "ex1", clock)
    assert isinstance(await reserve(pool, ask(clock, tokens=100), clock), Grant)
    pool.ledger = _Gone()
    # The lease is spent meanwhile: it was granted for lease_ttl_s.
    assert isinstance(await pool.reserve(ask(clock, tokens=100)), Grant)
    waiting = asyncio.ensure_future(pool.reserve(ask(clock, tokens=5000, deadline_in=60.0)))
    await tick(clock, 1.5)
    assert not waiting.done(), "a short silence (a restart) is waited out"
    await tick(clock, 3.0)
    refusal = waiting.result()
    assert (
        isinstance(refusal, Refusal) and "no budget can be had" in refusal.reason and "ActorDiedError" in refusal.reason
    )
    now_refused = await pool.reserve(ask(clock, tokens=10))
    assert isinstance(now_refused, Refusal) and "has not answered" in now_refused.reason
    pool.closed = True
    await pool.reporter.stop()
