"""The latency window and the breaker keep running sums and sorted values instead of recomputing them per
call (a replay asks them thousands of times a second): their answers must be exactly those of the plain
computation over the samples, whatever order samples, merges, expiry and eviction come in."""

from __future__ import annotations

import math
import random

import pytest

from tailrace.policies.breaker import BreakerConfig, CircuitBreaker
from tailrace.policies.latency import Health, LatencyConfig, ModelWindow, Sample


def plain_quantile(samples: list[Sample], metric: str, q: float, config: LatencyConfig) -> float | None:
    if metric == "tokens_per_s":
        values = sorted(s.tokens_per_s for s in samples if s.kind == "ok" and s.tokens_per_s is not None)
    else:
        values = sorted(
            getattr(s, f"{metric}_s") for s in samples if s.kind != "fail" and getattr(s, f"{metric}_s") is not None
        )
    if len(values) < config.min_samples:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def plain_health(samples: list[Sample], now: float, prior: float | None, config: LatencyConfig) -> Health:
    recent = [s for s in samples if s.at >= now - config.recent_s]
    answered = sum(1 for s in recent if s.kind == "ok")
    failed = sum(1 for s in recent if s.kind == "fail")
    events = answered + failed
    rate = failed / events if events else 0.0
    baselines = [b for b in (plain_quantile(samples, "latency", 0.5, config), prior) if b is not None]
    baseline = min(baselines) if baselines else None
    lat = sorted(s.latency_s for s in recent if s.kind != "fail" and s.latency_s is not None)
    shifted = (
        baseline is not None and len(lat) >= config.min_recent and lat[len(lat) // 2] > config.shift_factor * baseline
    )
    failing = events >= config.min_recent and rate >= config.unhealthy_failure_rate
    return Health(rate, events, shifted, failing or shifted)


@pytest.mark.parametrize("seed", range(6))
def test_the_window_answers_as_the_plain_computation_does(seed):
    rng = random.Random(seed)
    config = LatencyConfig(window_s=20.0, max_samples=40, min_samples=5, recent_s=4.0, min_recent=3)
    window = ModelWindow(config)
    now = 0.0
    for _ in range(600):
        now += rng.expovariate(8.0)
        kind = rng.choice(["ok", "ok", "ok", "fail", "censored"])
        latency = rng.lognormvariate(0, 0.6) * (3 if 200 < now % 300 < 260 else 1)
        at = now - (rng.uniform(0, 6) if rng.random() < 0.1 else 0.0)  # now and then a merged, older sample
        sample = Sample(
            at, kind, None if kind == "fail" else latency / 3, None if kind == "fail" else latency, rng.uniform(20, 80)
        )
        window.add(sample)
        if rng.random() < 0.5:
            window.expire(now)
        samples = window.samples()
        for metric in ("ttft", "latency", "tokens_per_s"):
            for q in (0.5, 0.9):
                assert window.quantile(metric, q) == plain_quantile(samples, metric, q, config)  # type: ignore[arg-type]
        prior = rng.choice([None, 0.8])
        ask_at = now - (rng.uniform(0, 3) if rng.random() < 0.05 else 0.0)  # a clock that stepped back
        assert window.health(ask_at, prior) == plain_health(samples, ask_at, prior, config)


def test_the_breaker_counts_failures_as_the_plain_sum_does():
    rng = random.Random(3)
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=50, failure_rate=0.5, window_s=5.0, min_requests=8))
    now = 0.0
    for _ in range(2000):
        now += rng.expovariate(20.0)
        breaker.record(now, failed=rng.random() < (0.6 if 30 < now % 60 < 35 else 0.1))
        assert breaker._failures == sum(1 for _, f in breaker._outcomes if f)
