"""Latency windows: quantiles, bounds in time and count, priors while cold, health, merging."""

from __future__ import annotations

import pytest

from tailrace.engine.clock import FakeClock
from tailrace.engine.specs import ModelChoice
from tailrace.policies.latency import LatencyConfig, LatencyStats, Sample, model_key

CHOICE = ModelChoice(provider="openai", model="m", max_tokens=100, expected_ttft_s=2.0, expected_latency_s=8.0)
KEY = model_key("openai", "m")


def stats(clock: FakeClock, **overrides) -> LatencyStats:
    config = LatencyConfig(**{"min_samples": 10, "window_s": 60, "max_samples": 100, "recent_s": 10, **overrides})
    return LatencyStats(config, clock)


def test_quantiles_are_nearest_rank_over_the_window():
    s = stats(FakeClock())
    for i in range(1, 21):  # latencies 1..20 s, TTFT a tenth of that
        s.observe(KEY, "ok", i / 10, float(i))
    assert s.quantile(KEY, "latency", 0.5) == 10.0
    assert s.quantile(KEY, "latency", 0.9) == 18.0
    assert s.quantile(KEY, "latency", 0.95) == 19.0
    assert s.quantile(KEY, "ttft", 0.9) == pytest.approx(1.8)
    assert s.latency_s(CHOICE, 0.9) == 18.0


def test_cold_model_uses_the_prior_conservatively():
    s = stats(FakeClock())
    for _ in range(9):  # one short of min_samples
        s.observe(KEY, "ok", 0.1, 0.5)
    assert s.quantile(KEY, "latency", 0.9) is None
    assert s.ttft_s(CHOICE, 0.9) == 3.0  # prior 2.0 x cold factor 1.5: hedge later, not sooner
    assert s.latency_s(CHOICE, 0.9, trigger=False) == 8.0  # fits use the prior as is


def test_a_cold_model_whose_attempts_time_out_backs_off_from_its_prior():
    """Karn's rule: an optimistic prior must not kill every attempt at the same point forever. Each
    timed-out attempt moves the cold trigger to where it fired, so the next timeout (2x) comes later."""
    clock = FakeClock()
    s = stats(clock)
    assert s.ttft_s(CHOICE, 0.9) == 3.0
    s.observe(KEY, "censored", 6.0, 6.0, ttft_censored=True, timed_out=True)  # killed at 2 x 3.0
    assert s.ttft_s(CHOICE, 0.9) == 6.0
    assert s.latency_s(CHOICE, 0.9) == 12.0  # 8.0 x 1.5 is still above what timed out
    s.observe(KEY, "censored", 12.0, 12.0, ttft_censored=True, timed_out=True)
    assert (s.ttft_s(CHOICE, 0.9), s.latency_s(CHOICE, 0.9)) == (12.0, 12.0)
    # A hedge that lost its race is not a timeout: it says nothing against the prior.
    s.observe(KEY, "censored", 30.0, 30.0, ttft_censored=True)
    assert s.ttft_s(CHOICE, 0.9) == 12.0
    # Fits keep the prior; the bound leaves the window with its sample.
    assert s.latency_s(CHOICE, 0.9, trigger=False) == 8.0
    clock.advance(61.0)
    assert s.ttft_s(CHOICE, 0.9) == 3.0


def test_fast_failures_are_not_latency_samples():
    s = stats(FakeClock())
    for _ in range(10):
        s.observe(KEY, "ok", 1.0, 5.0)
    for _ in range(50):
        s.observe(KEY, "fail")
    assert s.quantile(KEY, "latency", 0.1) == 5.0


def test_samples_expire_after_the_window():
    clock = FakeClock()
    s = stats(clock)
    for _ in range(10):
        s.observe(KEY, "ok", 1.0, 5.0)
    clock.advance(59.0)
    assert s.count(KEY) == 10
    clock.advance(2.0)
    assert s.count(KEY) == 0
    assert s.latency_s(CHOICE, 0.9) == 8.0 * 1.5  # cold again


def test_window_keeps_only_the_newest_samples():
    s = stats(FakeClock(), max_samples=10)
    for i in range(30):
        s.observe(KEY, "ok", 1.0, float(i))
    assert s.count(KEY) == 10
    assert s.quantile(KEY, "latency", 0.01) == 20.0


def test_health_failure_rate_and_latency_shift_over_the_recent_window():
    clock = FakeClock()
    s = stats(clock, min_recent=4, unhealthy_failure_rate=0.25, shift_factor=1.6)
    for _ in range(20):
        s.observe(KEY, "ok", 1.0, 4.0)
    assert not s.health(KEY).unhealthy
    clock.advance(15.0)  # the baseline is no longer recent
    for _ in range(3):
        s.observe(KEY, "ok", 1.0, 4.0)
    s.observe(KEY, "fail")
    h = s.health(KEY)
    assert (h.failure_rate, h.events, h.unhealthy) == (0.25, 4, True)
    clock.advance(15.0)
    for _ in range(4):
        s.observe(KEY, "ok", 3.0, 9.0)  # 9 s against a 4 s median: shifted
    assert s.health(KEY).shifted and s.health(KEY).unhealthy
    assert not s.health("never-seen").unhealthy


def test_snapshots_merge_across_processes():
    clock_a, clock_b = FakeClock(), FakeClock()
    a, b = stats(clock_a), stats(clock_b)
    for i in range(6):
        a.observe(KEY, "ok", 1.0, float(i))
    for i in range(6, 12):
        b.observe(KEY, "ok", 1.0, float(i))
    shared = a.take_new()
    assert a.take_new() == {}  # handed out once
    b.merge(shared)
    assert b.count(KEY) == 12 and b.quantile(KEY, "latency", 0.5) == 5.0
    assert b.take_new()[KEY] == [Sample(clock_b.time(), "ok", 1.0, float(i)) for i in range(6, 12)]


def test_merge_drops_expired_samples_and_keeps_time_order():
    clock = FakeClock()
    s = stats(clock)
    now = clock.time()
    s.merge(
        {KEY: [Sample(now - 100, "ok", 1.0, 1.0), Sample(now - 5, "ok", 1.0, 2.0), Sample(now - 30, "ok", 1.0, 3.0)]}
    )
    assert [x.latency_s for x in s.snapshot()[KEY]] == [3.0, 2.0]
    clock.advance(31.0)
    assert [x.latency_s for x in s.snapshot()[KEY]] == [2.0]


def test_a_brownout_longer_than_the_window_stays_shifted_against_the_prior():
    clock = FakeClock()
    s = stats(clock, min_recent=4)
    for _ in range(30):  # every sample in the window is slow: its own median is no baseline
        s.observe(KEY, "ok", 3.0, 30.0)
    assert not s.health(KEY).shifted
    assert s.health(KEY, prior_latency_s=8.0).shifted
