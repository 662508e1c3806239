"""Priority under contention: runs under way first, EDF among primaries, weighted fair share 2:1, duplicates last."""

from __future__ import annotations

import pytest

from tailrace.policies.priority import (
    CONTINUING,
    STARTING,
    FairQueue,
    Waiter,
    priority_class,
    rank,
    speculative_allowed,
)

KEY = "tokens:acct:*"


def waiter(tenant: str, deadline: float, size: float = 100.0) -> Waiter:
    return Waiter(tenant=tenant, deadline=deadline, need={KEY: size}, size=size, payload=(tenant, deadline))


def test_earliest_deadline_first_within_a_tenant():
    q = FairQueue(lambda t: 1.0)
    for d in (30.0, 10.0, 20.0, 5.0):
        q.push(waiter("a", d))
    assert [q.pop().deadline for _ in range(4)] == [5.0, 10.0, 20.0, 30.0]
    assert q.pop() is None


def test_fair_share_two_to_one_when_both_are_backlogged():
    q = FairQueue({"gold": 2.0, "std": 1.0}.__getitem__)
    for i in range(300):
        q.push(waiter("gold", 100.0 + i))
        q.push(waiter("std", 1.0 + i))  # std's deadlines are all earlier: EDF does not override shares
    served = {"gold": 0.0, "std": 0.0}
    for _ in range(300):
        w = q.pop()
        served[w.tenant] += w.size
    assert served["gold"] / served["std"] == pytest.approx(2.0, abs=0.05)


def test_fair_share_counts_tokens_not_requests():
    q = FairQueue(lambda t: 1.0)
    for i in range(100):
        q.push(waiter("big", float(i), size=300))
        q.push(waiter("small", float(i), size=100))
    served = {"big": 0.0, "small": 0.0}
    for _ in range(80):
        w = q.pop()
        served[w.tenant] += w.size
    assert served["big"] / served["small"] == pytest.approx(1.0, rel=0.1)


def test_an_idle_tenant_earns_no_credit():
    q = FairQueue(lambda t: 1.0)
    for i in range(50):
        q.push(waiter("a", float(i)))
    for _ in range(50):
        q.pop()
    for i in range(20):  # b arrives late: it does not get 50 pops of catch-up
        q.push(waiter("a", 100.0 + i))
        q.push(waiter("b", 100.0 + i))
    first_ten = [q.pop().tenant for _ in range(10)]
    assert first_ten.count("a") == 5


def test_removed_waiters_are_skipped():
    q = FairQueue(lambda t: 1.0)
    w1, w2 = waiter("a", 1.0), waiter("a", 2.0)
    q.push(w1)
    q.push(w2)
    q.remove(w1)
    assert len(q) == 1
    assert q.pop() is w2
    assert len(q) == 0


def test_needs_ahead_counts_earlier_deadlines_only():
    q = FairQueue(lambda t: 1.0)
    q.push(waiter("a", 1.0, 50))
    q.push(waiter("b", 2.0, 70))
    q.push(waiter("a", 9.0, 500))
    assert q.needs_ahead(5.0) == {KEY: 120}


def test_duplicates_are_speculative_and_only_use_spare_capacity():
    assert priority_class("duplicate") == "speculative"
    assert priority_class("primary") == priority_class("retry") == "primary"
    need = {KEY: 100.0}
    balances = {KEY: 1000.0}
    assert speculative_allowed(need, balances, {KEY: 0.6}, spare_fraction=0.25, primaries_waiting=False)
    # Near the ceiling duplicates stop first, while primaries are still served from the same balance.
    assert not speculative_allowed(need, balances, {KEY: 0.2}, spare_fraction=0.25, primaries_waiting=False)
    # Never ahead of a waiting primary.
    assert not speculative_allowed(need, balances, {KEY: 0.9}, spare_fraction=0.25, primaries_waiting=True)
    # Never waits for a top-up.
    assert not speculative_allowed(need, {KEY: 50.0}, {KEY: 0.9}, spare_fraction=0.25, primaries_waiting=False)


def test_steps_of_runs_under_way_are_served_before_runs_first_steps():
    q = FairQueue(lambda t: 2.0 if t == "gold" else 1.0)
    for i in range(5):
        q.push(Waiter("gold", 1.0 + i, {KEY: 10}, 10, f"new-gold-{i}", rank=STARTING))
    q.push(Waiter("std", 50.0, {KEY: 10}, 10, "continuing-std", rank=rank("primary", continuing=True)))
    q.push(Waiter("gold", 60.0, {KEY: 10}, 10, "retry-gold", rank=rank("retry", continuing=False)))
    served = [q.pop().payload for _ in range(7)]
    assert served[:2] == ["retry-gold", "continuing-std"] or served[:2] == ["continuing-std", "retry-gold"]
    assert served[2:] == [f"new-gold-{i}" for i in range(5)]
    assert rank("primary", continuing=False) == STARTING
    # What is ahead of a run's first step includes every step of runs under way, whatever its deadline.
    q.push(Waiter("std", 99.0, {KEY: 7}, 7, "late-continuing", rank=CONTINUING))
    assert q.needs_ahead(1.0, STARTING) == {KEY: 7}
    assert q.needs_ahead(1.0, CONTINUING) == {}
