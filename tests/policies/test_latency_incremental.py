"""The latency window caches its sorted values, quantiles and health, and the breaker keeps a running sum
(a replay asks them thousands of times a second): their answers must be exactly those computed afresh
over the same samples, whatever order samples, merges, expiry and eviction come in."""

from __future__ import annotations

import random

import pytest

from tailrace.policies.breaker import BreakerConfig, CircuitBreaker
from tailrace.policies.latency import LatencyConfig, ModelWindow, Sample


def fresh(samples: list[Sample], config: LatencyConfig) -> ModelWindow:
    window = ModelWindow(config)
    for sample in samples:
        window.add(sample)
    return window


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
                assert window.quantile(metric, q) == fresh(samples, config).quantile(metric, q)  # type: ignore[arg-type]
        prior = rng.choice([None, 0.8])
        ask_at = now - (rng.uniform(0, 3) if rng.random() < 0.05 else 0.0)  # a clock that stepped back
        assert window.health(ask_at, prior) == fresh(samples, config).health(ask_at, prior)


def test_the_breaker_counts_failures_as_the_plain_sum_does():
    rng = random.Random(3)
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=50, failure_rate=0.5, window_s=5.0, min_requests=8))
    now = 0.0
    for _ in range(2000):
        now += rng.expovariate(20.0)
        breaker.record(now, failed=rng.random() < (0.6 if 30 < now % 60 < 35 else 0.1))
        assert breaker._failures == sum(1 for _, f in breaker._outcomes if f)
