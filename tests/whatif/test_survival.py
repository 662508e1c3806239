"""Censored fits against known distributions: sample, censor the way hedging does, fit, compare."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tailrace.whatif.survival import (
    CENSORED,
    MISSING,
    OBSERVED,
    LogNormal,
    fit_mixture,
    kaplan_meier,
    km_quantile,
    log_sf,
    normal_quantile,
)


def _censor(t: np.ndarray, d: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, ...]:
    observed = t <= c
    log_t = np.log(np.minimum(t, c))
    return log_t, np.where(observed, OBSERVED, CENSORED), np.log(d), np.where(observed, OBSERVED, MISSING)


def test_the_normal_helpers_are_accurate_far_into_the_tail():
    for p in (1e-6, 0.001, 0.025, 0.5, 0.9, 0.999):
        z = normal_quantile(p)
        assert 0.5 * math.erfc(-z / math.sqrt(2)) == pytest.approx(p, rel=1e-6)
    z = np.array([-3.0, 0.0, 2.0, 8.0, 30.0])
    exact = [math.log(0.5 * math.erfc(v / math.sqrt(2))) for v in (-3.0, 0.0, 2.0, 8.0)]
    assert log_sf(z)[:4] == pytest.approx(exact, rel=1e-6)
    assert math.isfinite(log_sf(z)[4]) and log_sf(z)[4] < -400  # no underflow to -inf


def test_kaplan_meier_matches_the_hand_computed_curve():
    # times 1, 2+, 3, 4+, 5: S(1) = 4/5, S(3) = 4/5 * 2/3, S(5) = 0
    t, s = kaplan_meier(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([1, 0, 1, 0, 1]))
    assert list(t) == [1.0, 3.0, 5.0]
    assert s == pytest.approx([0.8, 0.8 * 2 / 3, 0.0])
    times, events = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([1, 0, 1, 0, 1])
    assert km_quantile(times, events, 0.4) == 3.0  # S(3) = 0.53 <= 0.6
    assert km_quantile(times, events, 0.5) == 5.0
    assert km_quantile(np.array([1.0, 2.0]), np.array([1, 0]), 0.9) == math.inf  # never gets there


def test_a_censored_lognormal_is_recovered_where_the_naive_fit_is_biased_fast():
    rng = np.random.default_rng(7)
    true = LogNormal(math.log(0.8), 0.5)
    n = 6000
    t = np.exp(rng.normal(true.mu, true.sigma, n))
    d = np.exp(rng.normal(math.log(0.02), 0.2, n))
    # Hedging's censoring: most attempts are backed up at about the p80 and cancelled soon after when
    # the duplicate wins; the rest run until the deadline.
    c = np.where(rng.random(n) < 0.7, true.quantile(0.8) * rng.uniform(1.0, 1.3, n), 30.0)
    fit = fit_mixture(*_censor(t, d, c))
    for q in (0.5, 0.9, 0.99):
        assert fit.ttft_quantile(q) == pytest.approx(true.quantile(q), rel=0.06), q
    assert fit.hang < 0.01
    # Treating the cancelled attempts' elapsed times as answers, or dropping them, makes the tail far too short.
    assert np.quantile(np.minimum(t, c), 0.99) < 0.85 * true.quantile(0.99)
    assert np.quantile(t[t <= c], 0.99) < 0.85 * true.quantile(0.99)


def test_stragglers_and_hangs_are_told_apart_from_the_usual_attempts():
    rng = np.random.default_rng(3)
    n = 8000
    straggler = rng.random(n) < 0.05
    factor = np.where(straggler, rng.uniform(3.0, 10.0, n), 1.0)
    t = np.exp(rng.normal(math.log(0.7), 0.4, n)) * factor
    d = np.exp(rng.normal(math.log(0.015), 0.15, n)) * factor  # a slow attempt streams slowly too
    hang = rng.random(n) < 0.01
    t[hang] = np.inf
    c = np.where(rng.random(n) < 0.5, 1.6, 60.0)
    fit = fit_mixture(*_censor(t, d, c))
    usual, slow = fit.components
    assert usual.weight == pytest.approx(0.94, abs=0.015)
    assert slow.weight == pytest.approx(0.05, abs=0.015)
    assert fit.hang == pytest.approx(0.01, abs=0.004)
    assert usual.ttft.median == pytest.approx(0.7, rel=0.05)
    assert slow.per_token.median > 3 * usual.per_token.median  # the stragglers' decode is slow as well
    everything = np.sort(t)
    for q in (0.5, 0.9, 0.95, 0.98):
        assert fit.ttft_quantile(q) == pytest.approx(everything[int(q * n)], rel=0.1), q


def test_a_warm_start_converges_to_the_same_fit():
    rng = np.random.default_rng(11)
    n = 3000
    t = np.exp(rng.normal(0.0, 0.5, n))
    d = np.exp(rng.normal(-4.0, 0.2, n))
    data = _censor(t, d, np.full(n, 2.0))
    cold = fit_mixture(*data)
    warm = fit_mixture(*data, start=cold, iterations=20)
    assert warm.ttft_quantile(0.9) == pytest.approx(cold.ttft_quantile(0.9), rel=0.01)
