"""When in a batch a model was degraded: a two-state hidden Markov model over its attempts in time order.

Providers degrade for minutes at a time (a brownout: everything slower, many overloaded errors),
not per request. A model's attempts, in the order they started, are emissions of a hidden state,
*normal* or *degraded*, that switches at exponential rates in continuous time (so a gap between two
attempts makes a switch more likely). In the degraded state time to first token and decode time are
multiplied by their own factors and errors come at their own rate and mix. Censored attempts
(cancelled, still waiting) count through their survival, as in the latency fit.

EM (forward-backward) fits the rates, factors and error rates; the Viterbi path gives the degraded
intervals. The degraded state is kept only when it explains the trace better than one steady state
by more than a BIC penalty, so a steady provider's random slow clusters stay random. The replay
then plays the same intervals at the same times of the batch (wrapping around past its end).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tailrace.engine.outcomes import ErrorKind
from tailrace.whatif.survival import Mixture, log_likelihood

MIN_ATTEMPTS = 60  # fewer: too little to tell a regime from noise
ITERATIONS = 12
MIN_FACTOR = 1.3  # a degraded state slower than this, or ...
MIN_EXTRA_ERRORS = 0.1  # ... failing this much more often, else it is no regime
MIN_SHARE = 0.005  # of the batch's time
MAX_SHIFT = math.log(20.0)


@dataclass(frozen=True)
class Regime:
    """A model's behaviour over the trace's time: normal, or degraded during `intervals`."""

    span_s: float
    intervals: tuple[tuple[float, float], ...] = ()  # degraded, seconds after the trace's start, in order
    ttft_factor: tuple[float, float] = (1.0, 1.0)  # per state: normal, degraded
    token_factor: tuple[float, float] = (1.0, 1.0)
    error_rates: tuple[dict[ErrorKind, float], dict[ErrorKind, float]] = ({}, {})

    def state_at(self, t: float) -> int:
        """0 (normal) or 1 (degraded) at `t` seconds after the start; past the trace's end, time wraps."""
        if not self.intervals:
            return 0
        t = t % self.span_s
        i = bisect.bisect_right(self._starts, t) - 1
        return 1 if i >= 0 and t < self.intervals[i][1] else 0

    @property
    def _starts(self) -> list[float]:
        return [a for a, _ in self.intervals]

    @property
    def degraded_share(self) -> float:
        return sum(b - a for a, b in self.intervals) / self.span_s if self.span_s > 0 else 0.0

    @classmethod
    def steady(cls, span_s: float, error_rates: dict[ErrorKind, float]) -> Regime:
        return cls(span_s, (), (1.0, 1.0), (1.0, 1.0), (dict(error_rates), dict(error_rates)))


@dataclass
class Attempts:
    """One model's attempts in start order: the inputs of `find_regime`."""

    times: np.ndarray  # seconds after the trace's start
    error: list[ErrorKind | None]  # the error kind, or None (answered, cancelled)
    eligible: np.ndarray  # could have failed (not cancelled before errors come)
    log_t: np.ndarray  # latency observations (see `fit._observations`); errors: anything, unused
    t_state: np.ndarray
    log_d: np.ndarray
    d_state: np.ndarray


def find_regime(a: Attempts, mixture: Mixture, span_s: float) -> tuple[Regime, np.ndarray]:
    """The regime, and each attempt's state on the Viterbi path (all 0 when there is no regime)."""
    n = len(a.times)
    kinds = Counter(k for k in a.error if k is not None)
    eligible = a.eligible | np.array([k is not None for k in a.error])
    overall = {k: c / max(1, int(eligible.sum())) for k, c in kinds.items()}
    steady = Regime.steady(span_s, overall)
    if n < MIN_ATTEMPTS:
        return steady, np.zeros(n, dtype=int)
    is_error = np.array([k is not None for k in a.error])
    latency_ll = lambda shift_t, shift_d: log_likelihood(  # noqa: E731
        mixture, a.log_t - shift_t, a.t_state, a.log_d - shift_d, a.d_state
    )
    base_ll = np.where(is_error, 0.0, latency_ll(0.0, 0.0))
    e0 = sum(kinds.values()) / max(1, int(eligible.sum()))
    p = _Params(
        e=[max(e0, 1e-4), min(0.9, max(0.2, 3 * e0))],
        shift_t=math.log(2.5),
        shift_d=math.log(2.5),
        rate01=4.0 / span_s,
        rate10=20.0 / span_s,
        mix=[_mix(kinds), _mix(kinds)],
    )
    gaps = np.diff(a.times, prepend=a.times[0])
    loglik = -math.inf
    for _ in range(ITERATIONS):
        emis = _emissions(a, is_error, eligible, base_ll, latency_ll(p.shift_t, p.shift_d), p)
        gamma, xi, loglik = _forward_backward(emis, gaps, p)
        _m_step(a, is_error, eligible, gamma, xi, gaps, p, mixture)
    emis = _emissions(a, is_error, eligible, base_ll, latency_ll(p.shift_t, p.shift_d), p)
    _, _, loglik = _forward_backward(emis, gaps, p)
    one_state = float(
        np.where(
            is_error, _error_ll(a, p.mix[0], e0), np.where(eligible, math.log(max(1e-12, 1 - e0)), 0.0) + base_ll
        ).sum()
    )
    states = _viterbi(emis, gaps, p)
    intervals = _intervals(a.times, states, span_s)
    regime = Regime(
        span_s,
        intervals,
        (1.0, math.exp(p.shift_t)),
        (1.0, math.exp(p.shift_d)),
        tuple({k: p.e[s] * w for k, w in p.mix[s].items()} for s in (0, 1)),  # type: ignore[arg-type]
    )
    penalty = 0.5 * 7 * math.log(n)  # two rates, two factors, a second error rate and mix
    distinct = max(regime.ttft_factor[1], regime.token_factor[1]) >= MIN_FACTOR or p.e[1] - p.e[0] >= MIN_EXTRA_ERRORS
    if loglik - one_state < penalty or not distinct or regime.degraded_share < MIN_SHARE:
        return steady, np.zeros(n, dtype=int)
    return regime, states


@dataclass
class _Params:
    e: list[float]  # error probability per state
    shift_t: float  # log factor of the degraded state's time to first token
    shift_d: float
    rate01: float  # per second: normal -> degraded
    rate10: float
    mix: list[dict[ErrorKind, float]]  # error kinds per state


def _mix(kinds: Counter[ErrorKind]) -> dict[ErrorKind, float]:
    total = sum(kinds.values())
    return {k: c / total for k, c in kinds.items()} if total else {}


def _error_ll(a: Attempts, mix: dict[ErrorKind, float], e: float) -> np.ndarray:
    return np.array([math.log(max(1e-12, e * mix.get(k, 1e-6))) if k is not None else 0.0 for k in a.error])


def _emissions(
    a: Attempts, is_error: np.ndarray, eligible: np.ndarray, normal_ll: np.ndarray, degraded_ll: np.ndarray, p: _Params
) -> np.ndarray:
    """log P(attempt | state), shape (n, 2)."""
    out = np.empty((len(a.times), 2))
    for s, ll in ((0, normal_ll), (1, degraded_ll)):
        answered = np.where(eligible, math.log(max(1e-12, 1 - p.e[s])), 0.0) + ll
        out[:, s] = np.where(is_error, _error_ll(a, p.mix[s], p.e[s]), answered)
    return out


def _stays(gaps: np.ndarray, p: _Params) -> tuple[list[float], list[float]]:
    """Per step between two attempts: the chance of staying normal, and of staying degraded."""
    return np.exp(-p.rate01 * gaps).tolist(), np.exp(-p.rate10 * gaps).tolist()


def _forward_backward(emis: np.ndarray, gaps: np.ndarray, p: _Params) -> tuple[np.ndarray, np.ndarray, float]:
    """Posteriors of each attempt's state (gamma), of each step's transition (xi), and the log likelihood.
    Two states, so plain floats: far faster than small matrices."""
    n = len(emis)
    scale = emis.max(axis=1)
    e = np.exp(emis - scale[:, None])
    e0, e1 = e[:, 0].tolist(), e[:, 1].tolist()
    stay0, stay1 = _stays(gaps, p)
    start = p.rate01 / (p.rate01 + p.rate10)
    a0, a1 = (1 - start) * e0[0], start * e1[0]
    norms = [a0 + a1]
    alpha = [(a0 / norms[0], a1 / norms[0])]
    for i in range(1, n):
        p0, p1 = alpha[-1]
        s0, s1 = stay0[i], stay1[i]
        a0 = (p0 * s0 + p1 * (1 - s1)) * e0[i]
        a1 = (p0 * (1 - s0) + p1 * s1) * e1[i]
        norm = a0 + a1
        norms.append(norm)
        alpha.append((a0 / norm, a1 / norm))
    beta = [(1.0, 1.0)] * n
    for i in range(n - 2, -1, -1):
        b0, b1 = beta[i + 1]
        s0, s1 = stay0[i + 1], stay1[i + 1]
        w0, w1 = e0[i + 1] * b0, e1[i + 1] * b1
        norm = norms[i + 1]
        beta[i] = ((s0 * w0 + (1 - s0) * w1) / norm, ((1 - s1) * w0 + s1 * w1) / norm)
    gamma = np.array([(x0 * y0, x1 * y1) for (x0, x1), (y0, y1) in zip(alpha, beta, strict=True)])
    gamma /= gamma.sum(axis=1, keepdims=True)
    xi01 = np.zeros(n)
    xi10 = np.zeros(n)
    for i in range(1, n):
        p0, p1 = alpha[i - 1]
        s0, s1 = stay0[i], stay1[i]
        w0, w1 = e0[i] * beta[i][0], e1[i] * beta[i][1]
        t00, t01, t10, t11 = p0 * s0 * w0, p0 * (1 - s0) * w1, p1 * (1 - s1) * w0, p1 * s1 * w1
        total = t00 + t01 + t10 + t11
        xi01[i], xi10[i] = t01 / total, t10 / total
    return gamma, np.stack([xi01, xi10], axis=1), float(np.log(norms).sum() + scale.sum())


def _m_step(
    a: Attempts,
    is_error: np.ndarray,
    eligible: np.ndarray,
    gamma: np.ndarray,
    xi: np.ndarray,
    gaps: np.ndarray,
    p: _Params,
    mixture: Mixture,
) -> None:
    for s in (0, 1):
        w = gamma[:, s]
        p.e[s] = float(min(0.95, max(1e-5, (w * is_error).sum() / max(1e-9, (w * eligible).sum()))))
        counts: Counter[ErrorKind] = Counter()
        for k, weight in zip(a.error, w, strict=True):
            if k is not None:
                counts[k] += float(weight)
        total = sum(counts.values())
        if total > 1e-9:
            p.mix[s] = {k: c / total for k, c in counts.items()}
    time0 = float((gaps[1:] * gamma[:-1, 0]).sum())
    time1 = float((gaps[1:] * gamma[:-1, 1]).sum())
    p.rate01 = max(1e-9, float(xi[:, 0].sum()) / max(1e-9, time0))
    p.rate10 = max(1e-9, float(xi[:, 1].sum()) / max(1e-9, time1))
    w1 = np.where(is_error, 0.0, gamma[:, 1])
    used = w1 > 1e-3
    if not used.any():
        return
    log_t, t_state, log_d, d_state, weights = a.log_t[used], a.t_state[used], a.log_d[used], a.d_state[used], w1[used]

    def objective(shift_t: float, shift_d: float) -> float:
        return float((weights * log_likelihood(mixture, log_t - shift_t, t_state, log_d - shift_d, d_state)).sum())

    p.shift_t = _golden(lambda x: objective(x, p.shift_d), 0.0, MAX_SHIFT)
    p.shift_d = _golden(lambda x: objective(p.shift_t, x), 0.0, MAX_SHIFT)


def _golden(f: object, lo: float, hi: float, steps: int = 16) -> float:
    """The maximum of a unimodal function on [lo, hi]."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)  # type: ignore[operator]
    for _ in range(steps):
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)  # type: ignore[operator]
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)  # type: ignore[operator]
    return (a + b) / 2


def _viterbi(emis: np.ndarray, gaps: np.ndarray, p: _Params) -> np.ndarray:
    n = len(emis)
    stay0, stay1 = _stays(gaps, p)
    log = lambda x: math.log(max(x, 1e-300))  # noqa: E731
    start = p.rate01 / (p.rate01 + p.rate10)
    e0, e1 = emis[:, 0].tolist(), emis[:, 1].tolist()
    v0, v1 = log(1 - start) + e0[0], log(start) + e1[0]
    back = [(0, 0)] * n
    for i in range(1, n):
        s0, s1 = stay0[i], stay1[i]
        from0 = (v0 + log(s0), v1 + log(1 - s1))  # into normal, from normal / degraded
        from1 = (v0 + log(1 - s0), v1 + log(s1))
        b0, b1 = int(from0[1] > from0[0]), int(from1[1] > from1[0])
        back[i] = (b0, b1)
        v0, v1 = from0[b0] + e0[i], from1[b1] + e1[i]
    states = np.zeros(n, dtype=int)
    states[-1] = int(v1 > v0)
    for i in range(n - 1, 0, -1):
        states[i - 1] = back[i][states[i]]
    return states


def _intervals(times: np.ndarray, states: np.ndarray, span_s: float) -> tuple[tuple[float, float], ...]:
    """Runs of the degraded state as time intervals, each edge halfway between two attempts."""
    out = []
    start: float | None = None
    for i, s in enumerate(states):
        edge = 0.0 if i == 0 else (times[i - 1] + times[i]) / 2
        if s == 1 and start is None:
            start = edge
        elif s == 0 and start is not None:
            out.append((start, edge))
            start = None
    if start is not None:
        out.append((start, span_s))
    return tuple(out)


__all__ = ["Attempts", "Regime", "find_regime"]
