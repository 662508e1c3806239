"""Leases on fake time: grants, spend reports, expiry of a dead executor's lease, rebalancing by demand,
idempotent exchanges, and the global limit holding at all times."""

from __future__ import annotations

import itertools
import random

import pytest

from tailrace.policies.budget_config import BudgetConfig, LimitSpec
from tailrace.policies.leases import BucketOp, DemandBoard, ExchangeRequest, LeaseBook, ProviderFeedback, SpendDelta

T0 = 1_000.0
KEY = "tokens:acct:*"
CONFIG = BudgetConfig(limits=[LimitSpec(account="acct", tpm=6000, rpm=60)])
ids = (f"r{i}" for i in itertools.count())


def book(**kw) -> LeaseBook:
    return LeaseBook(CONFIG.bucket, **kw)


def ex(b: LeaseBook, now: float, lease: str | None = None, executor: str = "e1", ttl: float = 2.0, **ops: BucketOp):
    req = ExchangeRequest(
        executor=executor, report_id=next(ids), lease_id=lease, ttl_s=ttl, ops={KEY: ops.get("tok", BucketOp())}
    )
    return b.exchange(req, now, new_lease_id=f"L{next(ids)}")


def test_grant_spend_return():
    b = book()
    r = ex(b, T0, tok=BucketOp(want=1000))
    assert r.granted == {KEY: 1000} and not r.lost
    assert b.outstanding(KEY) == 1000
    r2 = ex(b, T0 + 0.5, r.lease_id, tok=BucketOp(spent=300, ret=200))
    assert b.outstanding(KEY) == 500
    assert b.buckets[KEY].spent_total == 300 and b.buckets[KEY].returned_total == 200
    assert r2.lease_id == r.lease_id


def test_dead_executor_lease_expires_and_is_written_off_not_returned():
    b = book()
    r = ex(b, T0, tok=BucketOp(want=2000), ttl=2.0)
    assert b.outstanding(KEY) == 2000
    b.expire(T0 + 1.99)
    assert r.lease_id in b.leases
    b.expire(T0 + 2.0)
    assert r.lease_id not in b.leases
    bucket = b.buckets[KEY]
    assert bucket.outstanding == 0 and bucket.written_off_total == 2000
    # The written-off tokens count as spent, from the moment of expiry: they come back only by refill
    # (100/s here), and none was due while the lease held them and the bucket was full.
    assert bucket.available(T0 + 2.0) == pytest.approx(4000)
    assert bucket.available(T0 + 4.0) == pytest.approx(4200)
    # A late report under the dead lease is void: nothing is returned twice.
    late = ex(b, T0 + 2.5, r.lease_id, tok=BucketOp(ret=2000))
    assert late.lost
    assert bucket.returned_total == 0


def test_exchange_is_idempotent_per_report_id():
    b = book()
    req = ExchangeRequest(executor="e1", report_id="same", ops={KEY: BucketOp(want=500)})
    first = b.exchange(req, T0, "L1")
    again = b.exchange(req, T0 + 0.1, "L2")
    assert again == first
    assert b.outstanding(KEY) == 500


def test_exact_grants_all_or_nothing():
    b = book()
    ex(b, T0, tok=BucketOp(want=5900))
    req = ExchangeRequest(executor="e2", report_id="x", exact=True, ops={KEY: BucketOp(want=200)})
    assert b.exchange(req, T0, "L9").granted == {}
    assert b.outstanding(KEY) == 5900


def test_sum_of_outstanding_leases_never_exceeds_the_limit():
    """Many executors, random wants, spends, returns, deaths and refunds: at every step the
    outstanding leases plus the free level stay within the capacity (here 6000)."""
    rng = random.Random(7)
    b = book()
    leases: dict[str, str | None] = {f"e{i}": None for i in range(8)}
    held: dict[str, float] = dict.fromkeys(leases, 0.0)
    now = T0
    for _ in range(3000):
        now += rng.uniform(0.0, 0.2)
        e = rng.choice(list(leases))
        spent = rng.uniform(0, held[e])
        ret = rng.uniform(0, held[e] - spent) if rng.random() < 0.2 else 0.0
        if rng.random() < 0.02:  # the executor dies: it never reports again
            leases[e], held[e] = None, 0.0
            continue
        r = ex(
            b,
            now,
            leases[e],
            executor=e,
            ttl=rng.uniform(0.5, 3.0),
            tok=BucketOp(want=rng.uniform(0, 3000), spent=spent, ret=ret, refund=rng.uniform(0, 20)),
        )
        held[e] = (0.0 if r.lost else held[e] - spent - ret) + r.granted.get(KEY, 0.0)
        leases[e] = r.lease_id
        bucket = b.buckets[KEY]
        bucket.refill(now)
        assert b.outstanding(KEY) == pytest.approx(bucket.outstanding)
        assert bucket.outstanding + bucket.level <= bucket.capacity + 1e-6
        assert bucket.outstanding <= bucket.capacity + 1e-6


def test_provider_feedback_clamps_and_blocks():
    b = book()
    ex(b, T0, tok=BucketOp(want=1000))
    req = ExchangeRequest(
        executor="e1", report_id="fb", ops={KEY: BucketOp()}, feedback={KEY: ProviderFeedback(remaining=1500)}
    )
    reply = b.exchange(req, T0, "L")
    assert reply.buckets[KEY].level == pytest.approx(1500)  # free: never more than the provider has left
    req = ExchangeRequest(
        executor="e1", report_id="429", ops={KEY: BucketOp(want=10)}, feedback={KEY: ProviderFeedback(blocked_s=3.0)}
    )
    reply = b.exchange(req, T0, "L")
    assert reply.granted == {} and reply.buckets[KEY].blocked_s == pytest.approx(3.0)


def test_spend_is_recorded_per_tenant_and_day():
    b = book()
    req = ExchangeRequest(
        executor="e1",
        report_id="s1",
        day="2026-01-02",
        spend={"acme": SpendDelta(usd=0.5, input_tokens=10, output_tokens=5, attempts=1)},
    )
    b.exchange(req, T0, "L")
    b.exchange(req, T0, "L")  # a retry of the same report does not double-count
    assert b.spend[("2026-01-02", "acme")].usd == pytest.approx(0.5)
    assert b.spend[("2026-01-02", "acme")].attempts == 1


def test_restart_without_shared_ledger_starts_dry():
    b = book(start_full=False)
    assert ex(b, T0, tok=BucketOp(want=100)).granted == {}
    assert ex(b, T0 + 1.0, tok=BucketOp(want=100)).granted == {KEY: pytest.approx(100)}


def test_demand_board_splits_a_scarce_bucket_by_demand():
    board = DemandBoard(ttl_s=2.0)
    board.report("a", {KEY: 300}, {KEY: 0}, T0)
    board.report("b", {KEY: 100}, {KEY: 400}, T0)
    board.granted("b", {KEY: 400}, T0)
    capped, targets = board.cap("a", {KEY: 300}, {KEY: 200}, T0)
    assert targets[KEY] == pytest.approx(450)  # 3/4 of (200 free + 400 held)
    assert capped[KEY] == pytest.approx(200)  # all that is free: it is behind its share
    capped_b, targets_b = board.cap("b", {KEY: 100}, {KEY: 200}, T0)
    assert targets_b[KEY] == pytest.approx(150)  # b holds 400: it should return 250
    assert capped_b[KEY] == 0  # and it already got more than its share
    # Plenty free: no cap at all.
    assert board.cap("a", {KEY: 300}, {KEY: 5000}, T0)[0][KEY] == 300
    # A silent executor's demand is forgotten after the TTL.
    board.report("a", {KEY: 300}, {KEY: 0}, T0 + 3.0)
    assert board.cap("a", {KEY: 300}, {KEY: 200}, T0 + 3.0)[0][KEY] == pytest.approx(200)


def test_rebalancing_follows_demand_over_time():
    """Two executors on a saturated bucket, one consuming 3x as fast as the other could: each holds a
    balance, spends it at its own pace, reports and tops up every 50 ms. What they get converges to
    3:1, whichever asks first."""
    b = book()
    board = DemandBoard(ttl_s=1.0)
    rate = {"a": 600.0, "b": 200.0}  # tokens/s each could use; the bucket refills 100/s
    lease: dict[str, str | None] = {"a": None, "b": None}
    held = {"a": 0.0, "b": 0.0}
    used = {"a": 0.0, "b": 0.0}
    now = T0
    ex(b, now, tok=BucketOp(want=6000), executor="hog", ttl=0.5)  # drain the initial burst
    for step in range(600):
        now += 0.05
        for e in ("a", "b") if step % 2 else ("b", "a"):
            spent = min(held[e], rate[e] * 0.05)
            held[e] -= spent
            if step > 200:
                used[e] += spent
            want = rate[e] * 0.2
            board.report(e, {KEY: want}, {KEY: held[e]}, now)
            capped, _ = board.cap(e, {KEY: want}, {KEY: b.buckets[KEY].available(now)}, now)
            r = ex(b, now, lease[e], executor=e, tok=BucketOp(want=capped[KEY], spent=spent))
            board.granted(e, r.granted, now)
            lease[e] = r.lease_id
            held[e] += r.granted.get(KEY, 0.0)
    assert used["a"] / used["b"] == pytest.approx(3.0, rel=0.1)
    assert used["a"] + used["b"] == pytest.approx(100 * 0.05 * 399, rel=0.05)  # nothing wasted
