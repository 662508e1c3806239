"""The simulator's latency families and the single-failure scenarios of issue 8, checked on their plans."""

from __future__ import annotations

import statistics

import pytest

from tailrace.engine.sim import Fault, make_features, plan_response, scenario
from tailrace.engine.sim.config import FAMILIES, SCENARIOS


def plans(name: str, n: int = 4000, model: str = "gpt-4.1", **overrides):
    cfg = scenario(name, seed=5, **overrides)
    forced = cfg.force_fault.get(model)  # the server applies these
    return [
        plan_response(cfg, make_features("openai", model, [f"q{i}"], 400, stream=True), 0, forced=forced)
        for i in range(n)
    ]


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


def test_every_family_is_a_named_scenario():
    assert set(FAMILIES) <= set(SCENARIOS)
    assert len(FAMILIES) >= 4


def test_pareto_first_tokens_have_the_profiles_median_and_a_power_law_tail():
    ttft = [p.ttft_s for p in plans("pareto", fault_rates={}) if p.fault == Fault.OK]
    median = statistics.median(ttft)
    assert median == pytest.approx(0.75, rel=0.06)  # the mid profile's median
    # alpha 1.5: the q-quantile is median x (2 (1 - q))^(-1/1.5): p99 ~ 13.6x, p90 ~ 2.9x.
    assert quantile(ttft, 0.9) / median == pytest.approx(5 ** (2 / 3), rel=0.1)
    assert quantile(ttft, 0.99) / median == pytest.approx(50 ** (2 / 3), rel=0.25)


def test_bimodal_puts_a_tenth_of_requests_in_a_four_times_slower_mode():
    fast = plans("bimodal", fault_rates={})
    base = plans("clean")
    slowed = sum(1 for a, b in zip(fast, base, strict=True) if a.ttft_s > 3.9 * b.ttft_s)
    assert 0.08 < slowed / len(fast) < 0.12
    same = [a for a, b in zip(fast, base, strict=True) if a.ttft_s == b.ttft_s]
    assert len(same) + slowed == len(fast)


def test_lognormal_family_leaves_the_existing_draws_unchanged():
    assert [p.ttft_s for p in plans("clean", 200)] == [p.ttft_s for p in plans("clean", 200, latency={})]


def test_heavy_tail_mix_is_the_issues_provider():
    ps = plans("heavy-tail-mix", 20_000)
    share = {f: sum(p.fault == f for p in ps) / len(ps) for f in Fault}
    assert share[Fault.STRAGGLER] == pytest.approx(0.04, abs=0.006)
    assert share[Fault.HANG] == pytest.approx(0.01, abs=0.003)
    assert share[Fault.HTTP_500] + share[Fault.OVERLOADED] == pytest.approx(0.02, abs=0.004)
    straggler = next(p for p in ps if p.fault == Fault.STRAGGLER)
    assert straggler.ttft_s > 3 * 0.75


def test_brownout_mix_slows_the_first_rung_six_times_for_20_of_every_50_seconds():
    cfg = scenario("brownout-mix", seed=5)
    f = make_features("openai", "gpt-4.1", ["same"], 400)
    calm, storm = plan_response(cfg, f, 0, sim_time=5.0), plan_response(cfg, f, 0, sim_time=15.0)
    assert storm.degraded and not calm.degraded
    assert plan_response(cfg, f, 0, sim_time=65.0).degraded and not plan_response(cfg, f, 0, sim_time=35.0).degraded
    if storm.fault == calm.fault == Fault.OK:
        assert storm.ttft_s == pytest.approx(6 * calm.ttft_s)


def test_failure_mode_scenarios():
    assert {p.fault for p in plans("silent-route", 50)} == {Fault.HANG}
    assert {p.fault for p in plans("silent-route", 50, model="claude-haiku-4-5")} != {Fault.HANG}
    for p in plans("stall-halfway", 50):
        assert p.fault == Fault.STALL and p.stall_s == 30.0
        assert p.stall_after_chunk == max(1, round(len(p.chunks) / 2))
    assert {round(p.ttft_s, 6) for p in plans("slow-first-token", 20)} == {20.0}
