"""The ledger in memory and in a real Redis: the Lua script is the same arithmetic as `LeaseBook`, atomic
and shared between budget actors, idempotent across a restart, and it never leaks the Redis password."""

from __future__ import annotations

import random
import time

import pytest

from tailrace.policies.budget_config import BudgetConfig, LimitSpec, TenantBudget
from tailrace.policies.leases import BucketOp, ExchangeRequest, ProviderFeedback, SpendDelta
from tailrace.runtime.budget_ledger import LedgerUnavailable, MemoryLedger, RedisLedger, outage_debits

CONFIG = BudgetConfig(
    limits=[LimitSpec(account="acct", tpm=6000, rpm=60)], tenants={"acme": TenantBudget(daily_usd=2.0)}
)
TOK, REQ, USD = "tokens:acct:*", "requests:acct:*", "usd:acme:2026-01-02"
T0 = 1_700_000_000.0


def redis_ledger(url: str, namespace: str = "t") -> RedisLedger:
    return RedisLedger(url, namespace, CONFIG.bucket, timeout_s=0.5)


def random_requests(seed: int, n: int):
    """A random but replayable stream of exchanges by several executors, some of which die."""
    rng = random.Random(seed)
    now = T0
    leases: dict[str, str | None] = {f"e{i}": None for i in range(4)}
    for i in range(n):
        now += rng.uniform(0, 0.4)
        e = rng.choice(list(leases))
        ops = {
            k: BucketOp(
                want=rng.uniform(0, cap),
                spent=rng.uniform(0, cap / 4),
                ret=rng.uniform(0, cap / 8),
                refund=rng.uniform(0, cap / 50),
                debit=rng.uniform(0, cap / 100) if rng.random() < 0.1 else 0,
            )
            for k, cap in ((TOK, 3000), (REQ, 30), (USD, 0.5))
        }
        feedback = {TOK: ProviderFeedback(remaining=rng.uniform(0, 6000))} if rng.random() < 0.05 else {}
        if rng.random() < 0.03:
            feedback[REQ] = ProviderFeedback(blocked_s=rng.uniform(0, 1))
        yield (
            now,
            e,
            ExchangeRequest(
                executor=e,
                report_id=f"{seed}-{i}",
                lease_id=leases[e],
                ops=ops,
                feedback=feedback,
                spend={"acme": SpendDelta(usd=0.01, input_tokens=10, output_tokens=3, attempts=1)},
                day="2026-01-02",
                ttl_s=rng.uniform(0.3, 2.0),
                close=rng.random() < 0.05,
                exact=rng.random() < 0.2,
            ),
            f"L{seed}-{i}",
            leases,
        )


async def test_redis_lua_matches_the_in_memory_ledger_step_for_step(redis_server):
    server = redis_server()
    memory, shared = MemoryLedger(CONFIG.bucket), redis_ledger(server.url)
    try:
        for now, executor, req, new_id, leases in random_requests(seed=11, n=400):
            a = await memory.exchange(req, now, new_id)
            b = await shared.exchange(req, now, new_id)
            assert (a.lease_id, a.lost, set(a.granted)) == (b.lease_id, b.lost, set(b.granted)), req
            for key in a.granted:
                assert b.granted[key] == pytest.approx(a.granted[key], rel=1e-9, abs=1e-9)
            for key, view in a.buckets.items():
                other = b.buckets[key]
                assert (other.level, other.outstanding, other.blocked_s) == pytest.approx(
                    (view.level, view.outstanding, view.blocked_s), rel=1e-9, abs=1e-6
                )
                assert other.level + other.outstanding <= other.capacity + 1e-6
            leases[executor] = None if req.close else a.lease_id
        ms, rs = await memory.status("2026-01-02", now), await shared.status("2026-01-02", now)
        assert rs.spend["acme"].attempts == ms.spend["acme"].attempts == 400
        assert rs.spend["acme"].usd == pytest.approx(ms.spend["acme"].usd)
        for key, b in ms.buckets.items():
            assert rs.buckets[key].written_off == pytest.approx(b.written_off, abs=1e-6)
            assert rs.buckets[key].spent == pytest.approx(b.spent, abs=1e-6)
            assert rs.buckets[key].debited == pytest.approx(b.debited, abs=1e-6)
            # Every grant ends one way, in both: granted = spent + returned + written_off + outstanding.
            assert b.unreconciled == pytest.approx(0, abs=1e-6)
            assert rs.buckets[key].unreconciled == pytest.approx(0, abs=1e-6)
        assert rs.leases == ms.leases
    finally:
        await shared.aclose()


async def test_a_restarted_actor_resumes_and_a_retried_exchange_is_not_applied_twice(redis_server):
    server = redis_server()
    first = redis_ledger(server.url)
    req = ExchangeRequest(
        executor="e1",
        report_id="e1-7",
        ops={TOK: BucketOp(want=1000)},
        day="2026-01-02",
        spend={"acme": SpendDelta(usd=0.25, attempts=3)},
    )
    reply = await first.exchange(req, T0, "L1")
    await first.aclose()
    # The actor died before the executor got the reply; the executor sends the same request again.
    restarted = redis_ledger(server.url)
    try:
        again = await restarted.exchange(req, T0 + 0.5, "L2")
        assert again == reply
        status = await restarted.status("2026-01-02", T0 + 0.5)
        assert status.buckets[TOK].outstanding == pytest.approx(1000)  # granted once
        assert status.spend["acme"].usd == pytest.approx(0.25)  # recorded once
        assert status.spend["acme"].attempts == 3
        assert status.leases == 1
    finally:
        await restarted.aclose()


async def test_two_actors_on_one_redis_share_one_limit(redis_server):
    server = redis_server()
    a, b = redis_ledger(server.url), redis_ledger(server.url)
    try:
        granted = 0.0
        now = T0
        lease: dict[str, str | None] = {"a": None, "b": None}
        held = {"a": 0.0, "b": 0.0}
        for i in range(60):
            now += 0.1
            for name, ledger in (("a", a), ("b", b)):
                r = await ledger.exchange(
                    ExchangeRequest(
                        executor=name,
                        report_id=f"{name}{i}",
                        ttl_s=60,
                        lease_id=lease[name],
                        ops={TOK: BucketOp(want=500, spent=held[name])},
                    ),
                    now,
                    f"{name}L{i}",
                )
                lease[name], held[name] = r.lease_id, r.granted.get(TOK, 0.0)
                granted += held[name]
        # 6000 of burst + 100/s for 6 s: one bucket, not two.
        assert granted == pytest.approx(6000 + 100 * 6.0, rel=0.01)
        # A different namespace is a different ledger.
        other = redis_ledger(server.url, namespace="other")
        r = await other.exchange(ExchangeRequest(executor="c", report_id="c", ops={TOK: BucketOp(want=500)}), now, "cL")
        assert r.granted == {TOK: 500}
        await other.aclose()
    finally:
        await a.aclose()
        await b.aclose()


async def test_password_and_tls_urls_work_and_the_password_never_shows(redis_server):
    server = redis_server(password="s3cr3t-pw", tls=True)
    assert server.url.startswith("rediss://")
    ledger = redis_ledger(server.url)
    try:
        r = await ledger.exchange(ExchangeRequest(executor="e", report_id="x", ops={TOK: BucketOp(want=10)}), T0, "L")
        assert r.granted == {TOK: 10}
        assert "s3cr3t-pw" not in repr(ledger)
        assert "s3cr3t-pw" not in str((await ledger.status("2026-01-02", T0)).redis)
    finally:
        await ledger.aclose()
    wrong = redis_ledger(server.url.replace("s3cr3t-pw", "not-it"))
    with pytest.raises(LedgerUnavailable) as err:
        await wrong.ping()
    assert "not-it" not in str(err.value) and "s3cr3t-pw" not in str(err.value)
    await wrong.aclose()


async def test_an_unreachable_redis_fails_fast_with_a_redacted_error(redis_server):
    server = redis_server(password="hunter22")
    ledger = redis_ledger(server.url)
    await ledger.ping()
    server.stop()
    t0 = time.monotonic()
    with pytest.raises(LedgerUnavailable) as err:
        await ledger.exchange(ExchangeRequest(executor="e", report_id="y", ops={TOK: BucketOp(want=1)}), T0, "L")
    assert time.monotonic() - t0 < 3.0
    assert "hunter22" not in str(err.value) and "***" in str(err.value)
    await ledger.aclose()


async def test_a_redis_that_came_back_empty_opens_its_buckets_dry(redis_server):
    """A namespace Redis lost while the actor was using it (restarted without its data) must not open full:
    the provider's window still holds recent use. A namespace seen for the first time opens full."""
    import redis as redis_client

    server = redis_server()
    ledger = redis_ledger(server.url)
    try:
        first = await ledger.exchange(
            ExchangeRequest(executor="e", report_id="a", ops={TOK: BucketOp(want=10)}), T0, "L"
        )
        assert first.buckets[TOK].level == pytest.approx(6000 - 10)  # new: full
        client = redis_client.Redis.from_url(server.url)
        client.flushall()  # what a restart without persistence leaves
        client.close()
        again = await ledger.exchange(
            ExchangeRequest(executor="e", report_id="b", lease_id=first.lease_id, ops={TOK: BucketOp(want=10)}), T0, "M"
        )
        assert again.lost and again.buckets[TOK].level == pytest.approx(0) and not again.granted
        # It refills from empty at the bucket's rate (6000 per minute).
        later = await ledger.exchange(
            ExchangeRequest(executor="e", report_id="c", ops={TOK: BucketOp(want=10)}), T0 + 6, "N"
        )
        assert later.granted[TOK] == pytest.approx(10) and later.buckets[TOK].level == pytest.approx(590)
    finally:
        await ledger.aclose()


async def test_what_was_used_during_an_outage_is_charged_back_and_both_ledgers_add_up(redis_server):
    server = redis_server()
    shared = redis_ledger(server.url)
    fallback = MemoryLedger(CONFIG.bucket, start_full=False, scale=0.5)
    try:
        await shared.exchange(
            ExchangeRequest(executor="e", report_id="before", ops={TOK: BucketOp(want=100)}), T0, "L0"
        )
        now = T0
        for now, _executor, req, new_id, _leases in random_requests(seed=5, n=120):
            await fallback.exchange(req, now, new_id)
        book = fallback.book
        debits = outage_debits(book)
        for key, b in book.buckets.items():
            assert b.unreconciled == pytest.approx(0, abs=1e-6)
            # Used = what was granted and not given back, plus use beyond grants.
            assert debits[key].debit == pytest.approx(
                b.spent_total + b.written_off_total + b.outstanding + b.debited_total, rel=1e-9
            )
        await shared.exchange(ExchangeRequest(executor="resync", report_id="r", ops=debits, close=True), now, "R")
        status = await shared.status("2026-01-02", now)
        for key, op in debits.items():
            assert status.buckets[key].debited == pytest.approx(op.debit)
            assert status.buckets[key].unreconciled == pytest.approx(0, abs=1e-6)
    finally:
        await shared.aclose()
