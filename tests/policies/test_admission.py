"""Run admission on fake time: EDF feasibility, immediate refusal, corrections, fair share between tenants."""

from __future__ import annotations

import pytest

from tailrace.policies.admission import AdmissionPlanner, Part

KEY = "tokens:acct:*"
T0 = 1_000.0


def planner(capacity=1000.0, rate=100.0, weights=None, margin=0.0) -> AdmissionPlanner:
    w = weights or {}
    return AdmissionPlanner({KEY: (capacity, rate)}, lambda t: w.get(t, 1.0), T0, margin=margin)


def whole(need: dict[str, float], latest: float) -> list[Part]:
    """A run planned as one part: all its tokens by one latest start."""
    return [Part(latest, need, "step 'only'")]


def test_admits_what_fits_and_refuses_what_cannot_arrive_before_its_latest_start():
    p = planner()
    assert p.admit("r1", "a", whole({KEY: 1000}, T0 + 1), now=T0) is None  # the full bucket
    assert p.admit("r2", "a", whole({KEY: 500}, T0 + 6), now=T0) is None  # 5 s of refill
    why = p.admit("r3", "a", whole({KEY: 200}, T0 + 6), now=T0)
    assert why is not None and "tokens:acct:*" in why
    assert p.admit("r4", "a", whole({KEY: 200}, T0 + 7), now=T0) is None


def test_edf_an_urgent_run_goes_ahead_of_runs_with_slack():
    p = planner()
    assert p.admit("late1", "a", whole({KEY: 1000}, T0 + 20), now=T0) is None
    assert p.admit("late2", "a", whole({KEY: 500}, T0 + 20), now=T0) is None
    # Arrives later but is due sooner: fits ahead of them since they still make it by T0 + 20.
    assert p.admit("urgent", "a", whole({KEY: 500}, T0 + 5), now=T0) is None
    # Fits its own latest start (T0 + 6) but would push late2 to T0 + 21.
    assert "admitted run late" in p.admit("too_much", "a", whole({KEY: 1100}, T0 + 10), now=T0)
    assert p.admit("fits", "a", whole({KEY: 1000}, T0 + 10), now=T0) is None


def test_refuses_when_the_deadline_leaves_no_time():
    p = planner()
    assert p.admit("r", "a", whole({KEY: 1}, T0 - 0.1), now=T0) is not None


def test_a_run_is_planned_step_by_step_not_all_at_once():
    """Later steps need their tokens only by their own latest start: a run that could not have all its
    tokens at its first step's latest start is admitted when each step's share arrives in time."""
    p = planner(capacity=500, rate=100)
    parts = [Part(T0 + 1, {KEY: 500}, "step 'a'"), Part(T0 + 6, {KEY: 400}, "step 'b'")]
    assert p.admit("staged", "a", parts, now=T0) is None
    why = p.admit("r2", "a", [Part(T0 + 1, {KEY: 150}, "step 'x'")], now=T0)
    assert why is not None and "step 'x'" in why and "500 due earlier" in why  # names its figures
    # The full bucket serves the first part, 4 s of refill the second; by T0 + 7 there are 300 more.
    assert p.admit("r3", "a", [Part(T0 + 7, {KEY: 200}, "step 'y'")], now=T0) is None
    assert p.admit("r4", "a", [Part(T0 + 7, {KEY: 101}, "step 'z'")], now=T0) is not None
    assert p.admit("r5", "a", [Part(T0 + 7, {KEY: 100}, "step 'z'")], now=T0) is None


def test_done_corrects_the_plan_with_actual_use():
    p = planner()
    assert p.admit("r1", "a", whole({KEY: 1000}, T0 + 1), now=T0) is None
    assert p.admit("r2", "a", whole({KEY: 200}, T0 + 1), now=T0) is not None
    p.done("r1", {KEY: 400}, now=T0)  # used far less than planned
    assert p.free(KEY, T0) == pytest.approx(600)
    assert p.admit("r2", "a", whole({KEY: 200}, T0 + 1), now=T0) is None
    p.done("r2", {KEY: 700}, now=T0)  # retries: more than planned is charged
    assert p.free(KEY, T0) == pytest.approx(-100)
    assert p.admit("r3", "a", whole({KEY: 100}, T0 + 1.9), now=T0) is not None
    assert p.admit("r3", "a", whole({KEY: 100}, T0 + 2.0), now=T0) is None


def test_sync_never_plans_with_more_than_the_ledger_has():
    p = planner()
    p.sync(KEY, 100.0, T0)
    assert p.admit("r", "a", whole({KEY: 300}, T0 + 1), now=T0) is not None


def test_margin_plans_below_the_rate():
    p = planner(capacity=100, rate=100, margin=0.5)
    assert p.admit("r1", "a", whole({KEY: 100}, T0), now=T0 - 1e-9) is None
    assert p.admit("r2", "a", whole({KEY: 100}, T0 + 1.5), now=T0) is not None  # only 50/s planned
    assert p.admit("r3", "a", whole({KEY: 100}, T0 + 2.1), now=T0) is None


def test_fair_share_two_to_one_between_backlogged_tenants():
    """Both tenants offer far more than the bucket can serve; admitted tokens split 2:1 by weight."""
    p = planner(capacity=1000, rate=100, weights={"gold": 2.0, "std": 1.0})
    admitted = {"gold": 0.0, "std": 0.0}
    now, n = T0, 0
    while now < T0 + 120:
        for tenant in ("gold", "std", "std", "gold", "std"):  # std asks more often
            n += 1
            run = f"{tenant}{n}"
            if p.admit(run, tenant, whole({KEY: 50}, now + 2.0), now=now) is None:
                if now > T0 + 20:
                    admitted[tenant] += 50
                p.done(run, {KEY: 50}, now)
        now += 0.1
    assert admitted["gold"] / admitted["std"] == pytest.approx(2.0, rel=0.1)
    assert sum(admitted.values()) == pytest.approx(100 * 100, rel=0.05)  # the whole rate is used


def test_a_lone_tenant_may_use_everything():
    p = planner(weights={"gold": 2.0, "std": 1.0})
    got, now = 0.0, T0
    while now < T0 + 60:
        if p.admit(f"r{now}", "std", whole({KEY: 50}, now + 2.0), now=now) is None:
            got += 50
        now += 0.1
    assert got == pytest.approx(1000 + 100 * 60, rel=0.05)


def test_a_tenant_that_is_never_refused_holds_no_share_back():
    """Gold asks for 20 tokens/s with plenty of slack (never refused), std for far more than the rest:
    std is not held back for a share gold never missed, so the whole rate is used."""
    p = planner(capacity=1000, rate=100, weights={"gold": 2.0, "std": 1.0})
    got, now, tick, gold_asked = {"gold": 0.0, "std": 0.0}, T0, 0, 0
    while now < T0 + 60:
        asks = [("std", now + 2.0)] + ([("gold", now + 30.0)] if tick % 10 == 0 else [])
        gold_asked += 20 * (tick % 10 == 0)
        for tenant, latest in asks:
            run = f"{tenant}-{tick}"
            if p.admit(run, tenant, whole({KEY: 20}, latest), now=now) is None:
                got[tenant] += 20
                p.done(run, {KEY: 20}, now)
        now, tick = now + 0.1, tick + 1
    assert got["gold"] == gold_asked  # everything it asked for
    assert sum(got.values()) == pytest.approx(1000 + 100 * 60, rel=0.05)  # the whole rate is used


def test_holds_of_attempts_in_flight_are_set_aside_while_they_last_never_ratcheted():
    p = planner()
    p.sync(KEY, 1000.0, T0, held=600.0)  # attempts in flight hold 600 beyond what the plan counted
    assert p.admit("r1", "a", whole({KEY: 600}, T0 + 1), now=T0) is not None  # 400 + 1 s of refill
    p.sync(KEY, 1000.0, T0, held=0.0)  # they ended: the provider corrected its window
    assert p.admit("r1", "a", whole({KEY: 600}, T0 + 1), now=T0) is None
