"""Token buckets on fake time: continuous refill, leases held inside the capacity, provider feedback."""

from __future__ import annotations

import math

import pytest

from tailrace.policies.buckets import TokenBucket

T0 = 1_000.0


def test_starts_full_and_refills_continuously_at_capacity_per_window():
    b = TokenBucket.full(600.0, 10.0, T0)  # 600 per minute
    assert b.take(600, T0) == 600
    assert b.available(T0) == 0
    assert b.available(T0 + 1.5) == pytest.approx(0.0)  # taken tokens are held by the lease: no refill
    b.spend(600, T0 + 1.5)  # the lease spent them
    assert b.available(T0 + 3.0) == pytest.approx(15.0)  # refill resumes once they left the bucket
    assert b.available(T0 + 100) == pytest.approx(600.0)  # never above capacity


def test_partial_grant_and_exact_grant():
    b = TokenBucket.full(100.0, 1.0, T0)
    assert b.take(70, T0) == 70
    assert b.take(70, T0) == 30  # what is left
    b2 = TokenBucket.full(100.0, 1.0, T0)
    assert b2.take_exactly(60, T0)
    assert not b2.take_exactly(60, T0)
    assert b2.level == pytest.approx(40)


def test_held_tokens_earn_no_refill_even_when_reported_late():
    """Refill is due only for room that existed: a lease that held everything for 10 s and then
    reports it spent gets no credit for those 10 s (the provider's bucket was full all along)."""
    b = TokenBucket.full(600.0, 10.0, T0)
    b.take(600, T0)
    b.spend(600, T0 + 10.0)
    assert b.available(T0 + 10.0) == 0
    assert b.available(T0 + 11.0) == pytest.approx(10.0)


def test_level_plus_outstanding_never_exceeds_capacity():
    b = TokenBucket.full(1000.0, 50.0, T0)
    now = T0
    for i in range(200):
        now += 0.37
        b.take(120 if i % 3 else 400, now)
        if i % 2:
            b.spend(min(b.outstanding, 90), now)
        if i % 5 == 0:
            b.give_back(50, now)
        if i % 7 == 0:
            b.write_off(30, now)
        b.refill(now)
        assert b.level + b.outstanding <= b.capacity + 1e-6


def test_seconds_until_is_exact_and_infinite_when_it_cannot_fit():
    b = TokenBucket.full(600.0, 10.0, T0)
    b.take(600, T0)
    b.spend(600, T0)
    assert b.seconds_until(100, T0) == pytest.approx(10.0)
    assert b.seconds_until(601, T0) == math.inf
    daily = TokenBucket.full(5.0, 0.0, T0)  # a daily USD allowance: no refill
    daily.take(5.0, T0)
    daily.spend(5.0, T0)
    assert daily.seconds_until(0.01, T0 + 1e6) == math.inf


def test_give_back_and_refund_become_grantable_again_within_capacity():
    b = TokenBucket.full(100.0, 0.0, T0)
    b.take(100, T0)
    b.give_back(40, T0)
    assert b.available(T0) == 40 and b.outstanding == 60
    b.spend(60, T0)
    b.refund(1000, T0)  # never above capacity - outstanding
    assert b.available(T0) == 100


def test_debit_is_a_debt_repaid_by_refill_first():
    b = TokenBucket.full(100.0, 10.0, T0)
    b.take(100, T0)
    b.spend(100, T0)
    b.debit(50, T0)
    assert b.available(T0) == 0
    assert b.available(T0 + 5) == 0  # -50 + 50
    assert b.available(T0 + 6) == pytest.approx(10)


def test_provider_clamp_trusts_a_lower_remaining():
    b = TokenBucket.full(1000.0, 10.0, T0)
    b.take(300, T0)  # 700 free, 300 held (maybe in flight, charged)
    assert b.clamp(500, T0) == pytest.approx(200)  # provider: 500 left -> never more than that free
    assert b.available(T0) == pytest.approx(500)
    assert b.clamp(5000, T0) == 0  # a higher remaining never adds tokens


def test_block_on_429_grants_nothing_until_retry_after():
    b = TokenBucket.full(1000.0, 100.0, T0)
    b.block(2.0, T0)
    assert b.available(T0 + 1.9) == 0
    assert b.seconds_until(50, T0) == pytest.approx(2.0)
    assert b.available(T0 + 2.0) == pytest.approx(200)  # level dropped to 0, refilled for 2 s


def test_resize_lower_capacity_takes_effect_at_once():
    b = TokenBucket.full(1000.0, 10.0, T0)
    b.resize(100.0, 1.0, T0)
    assert b.available(T0) == 100
