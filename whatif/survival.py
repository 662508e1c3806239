"""Latency distributions from traces where many attempts never finished: censored fits.

An attempt cancelled because it lost a hedge race, hit its deadline or belonged to a failed run says
its latency was *at least* its elapsed time. Dropping those, or counting them as answers, biases a
fit fast: the slow attempts are exactly the ones hedging cancels. Here they are right-censored
observations:

* `kaplan_meier`: the nonparametric survival curve (for checks, medians and reports).
* `fit_mixture`: a mixture of lognormal components for two variables at once -- time to first
  token and per-token decode time -- plus a *hang* mass (an attempt that never answers), fitted by
  EM with censoring. A component is a kind of attempt (the usual ones, the stragglers); both
  variables share it, so a straggler that is late to its first token is also slow to stream, as
  providers' slow requests are. Censored values enter the M-step through the truncated normal's
  moments (the classical EM for censored data); a censored first token contributes nothing to the
  decode time it never showed.

Everything works on logarithms of seconds and is vectorised with numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
MIN_SIGMA = 0.03
SEEN_DECODES = 5.0  # effective finished answers a kind of attempt needs for its own decode time
OBSERVED, CENSORED, MISSING = 0, 1, 2


# ---- the standard normal, stable in the far tail -----------------------------------------------------


def log_erfc(x: np.ndarray) -> np.ndarray:
    """log(erfc(x)), accurate to ~1e-7 relative (Numerical Recipes' erfcc), and finite far into the tail."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (
        -z * z
        - 1.26551223
        + t
        * (
            1.00002368
            + t
            * (
                0.37409196
                + t
                * (
                    0.09678418
                    + t
                    * (
                        -0.18628806
                        + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))
                    )
                )
            )
        )
    )
    log_pos = np.log(t) + poly
    # erfc(-z) = 2 - erfc(z)
    return np.where(x >= 0, log_pos, np.log(np.maximum(2.0 - np.exp(log_pos), 1e-300)))


def log_sf(z: np.ndarray) -> np.ndarray:
    """log P(Z > z) for a standard normal Z."""
    return log_erfc(z / math.sqrt(2.0)) - math.log(2.0)


def log_pdf(z: np.ndarray) -> np.ndarray:
    return -0.5 * z * z - LOG_SQRT_2PI


def normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """The standard normal's p-quantile (Acklam's rational approximation, refined by one Newton step)."""
    if not 0.0 < p < 1.0:
        return math.inf if p >= 1.0 else -math.inf
    a = (
        -39.69683028665376,
        220.9460984245205,
        -275.9285104469687,
        138.3577518672690,
        -30.66479806614716,
        2.506628277459239,
    )
    b = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972, -13.28068155288572)
    c = (
        -0.007784894002430293,
        -0.3223964580411365,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    )
    d = (0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416)
    low = 0.02425
    if p < low:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    elif p <= 1 - low:
        q = p - 0.5
        r = q * q
        x = (
            (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
            * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
        )
    else:
        q = math.sqrt(-2 * math.log(1 - p))
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    e = normal_cdf(x) - p
    return x - e * math.sqrt(2 * math.pi) * math.exp(x * x / 2)


# ---- Kaplan-Meier -----------------------------------------------------------------------------------


def kaplan_meier(times: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The survival curve S(t) = P(T > t) from right-censored data: event times and S just after each."""
    order = np.lexsort((~observed.astype(bool), times))  # at a tie, events before censorings
    t, o = times[order], observed[order].astype(bool)
    at_risk = len(t) - np.arange(len(t))
    factors = np.where(o, 1.0 - 1.0 / at_risk, 1.0)
    survival = np.cumprod(factors)
    return t[o], survival[o]


def km_quantile(times: np.ndarray, observed: np.ndarray, q: float) -> float:
    """The smallest t with S(t) <= 1 - q; inf when the curve never gets there (too much censoring)."""
    t, s = kaplan_meier(times, observed)
    hit = np.nonzero(s <= 1.0 - q + 1e-12)[0]
    return float(t[hit[0]]) if len(hit) else math.inf


# ---- the mixture ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogNormal:
    mu: float  # of the log
    sigma: float

    @property
    def median(self) -> float:
        return math.exp(self.mu)

    def quantile(self, q: float) -> float:
        return math.exp(self.mu + self.sigma * normal_quantile(q))

    def sf(self, x: float) -> float:
        if x <= 0:
            return 1.0
        return 1.0 - normal_cdf((math.log(x) - self.mu) / self.sigma)


@dataclass(frozen=True)
class Component:
    weight: float
    ttft: LogNormal
    per_token: LogNormal  # seconds per output token after the first


@dataclass(frozen=True)
class Mixture:
    """Components (weights summing to 1 - hang) and the hang mass: attempts that never answer."""

    components: tuple[Component, ...]
    hang: float
    observations: int = 0
    censored: int = 0

    def ttft_sf(self, x: float) -> float:
        """P(time to first token > x), hangs included."""
        return self.hang + sum(c.weight * c.ttft.sf(x) for c in self.components)

    def ttft_quantile(self, q: float) -> float:
        """The q-quantile of time to first token (inf when hangs make up more than 1 - q)."""
        if 1.0 - q <= self.hang:
            return math.inf
        lo, hi = 1e-9, 1.0
        while self.ttft_sf(hi) > 1.0 - q:
            hi *= 2.0
            if hi > 1e9:
                return math.inf
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            if self.ttft_sf(mid) > 1.0 - q:
                lo = mid
            else:
                hi = mid
        return hi


def log_likelihood(
    m: Mixture, log_t: np.ndarray, t_state: np.ndarray, log_d: np.ndarray, d_state: np.ndarray
) -> np.ndarray:
    """Each observation's log likelihood under the mixture (censored values: their survival)."""
    parts = [
        math.log(max(c.weight, 1e-300))
        + _component_loglik(log_t, t_state, c.ttft.mu, c.ttft.sigma)
        + _component_loglik(log_d, d_state, c.per_token.mu, c.per_token.sigma)
        for c in m.components
    ]
    parts.append(np.where(t_state == CENSORED, math.log(max(m.hang, 1e-300)), -np.inf))
    stacked = np.stack(parts, axis=1)
    top = stacked.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(stacked - top).sum(axis=1))


def _component_loglik(x: np.ndarray, state: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    z = (x - mu) / sigma
    out = np.zeros_like(z)
    observed, censored = state == OBSERVED, state == CENSORED
    out[observed] = log_pdf(z[observed]) - math.log(sigma)
    if censored.any():  # the survival is the costly part: only where it is needed
        out[censored] = log_sf(z[censored])
    return out


@dataclass
class _Params:
    weights: np.ndarray  # per component, then the hang mass last
    mt: np.ndarray
    st: np.ndarray
    md: np.ndarray
    sd: np.ndarray


def fit_mixture(
    log_t: np.ndarray,
    t_state: np.ndarray,
    log_d: np.ndarray,
    d_state: np.ndarray,
    *,
    components: int = 2,
    iterations: int = 300,
    tolerance: float = 1e-6,
    start: Mixture | None = None,
) -> Mixture:
    """Fit the mixture by EM. `log_t`: log time to first token, observed or right-censored
    (`t_state` OBSERVED / CENSORED); `log_d`: log per-token time, OBSERVED, CENSORED or MISSING.
    `start` warm-starts from an earlier fit (bootstrap refits converge in a few steps)."""
    n = len(log_t)
    if n == 0:
        raise ValueError("no observations to fit")
    t_obs = t_state == OBSERVED
    t_cens = t_state == CENSORED
    d_obs = d_state == OBSERVED
    d_cens = d_state == CENSORED
    d_used = d_obs | d_cens
    p = _initial(log_t, t_obs, log_d, d_obs, components, bool(t_cens.any())) if start is None else _from(start)
    previous = -math.inf
    for _ in range(iterations):
        # E-step: log likelihood of every observation under every component (and the hang).
        ll = np.empty((n, components + 1))
        for k in range(components):
            lt = _component_loglik(log_t, t_state, p.mt[k], p.st[k])
            ld = _component_loglik(log_d, d_state, p.md[k], p.sd[k])
            ll[:, k] = math.log(max(p.weights[k], 1e-300)) + lt + ld
        ll[:, components] = np.where(t_cens, math.log(max(p.weights[components], 1e-300)), -np.inf)
        top = ll.max(axis=1, keepdims=True)
        total = top[:, 0] + np.log(np.exp(ll - top).sum(axis=1))
        resp = np.exp(ll - total[:, None])
        loglik = float(total.sum())
        # M-step.
        weights = resp.mean(axis=0)
        if start is None and not t_cens.any():
            weights[components] = 0.0
        for k in range(components):
            r = resp[:, k]
            p.mt[k], p.st[k] = _censored_moments(log_t, t_obs, t_cens, r, p.mt[k], p.st[k])
            rd = np.where(d_used, r, 0.0)
            if rd.sum() > 1e-9:
                p.md[k], p.sd[k] = _censored_moments(log_d, d_obs, d_cens, rd, p.md[k], p.sd[k])
        p.weights = weights / weights.sum()
        if loglik - previous < tolerance * n:
            break
        previous = loglik
    _unseen_decode(p, resp, d_obs, components)
    order = np.argsort(p.mt + p.md)  # the fast kind of attempt first
    comps = tuple(
        Component(
            float(p.weights[k]),
            LogNormal(float(p.mt[k]), float(p.st[k])),
            LogNormal(float(p.md[k]), float(p.sd[k])),
        )
        for k in order
    )
    return Mixture(comps, float(p.weights[components]), n, int(t_cens.sum()))


def _unseen_decode(p: _Params, resp: np.ndarray, d_obs: np.ndarray, components: int) -> None:
    """A kind of attempt that almost never finished (stragglers a hedge or a deadline always cut off)
    leaves its decode time unbounded above: EM only creeps toward the censoring points. Such a kind is
    taken to stream as much slower than the usual attempts as it is to its first token -- the way
    providers' slow requests are slow throughout -- unless its censored samples demand slower still."""
    usual = int(np.argmax(p.weights[:components]))
    for k in range(components):
        if k == usual or float((resp[:, k] * d_obs).sum()) >= SEEN_DECODES:
            continue
        p.md[k] = max(p.md[k], p.md[usual] + max(0.0, p.mt[k] - p.mt[usual]))
        p.sd[k] = max(p.sd[k], p.sd[usual])


def _censored_moments(
    x: np.ndarray, observed: np.ndarray, censored: np.ndarray, r: np.ndarray, mu: float, sigma: float
) -> tuple[float, float]:
    """One EM update of a normal's mean and sigma from weighted observed and right-censored values."""
    alpha = (x - mu) / sigma
    mills = np.exp(log_pdf(alpha) - log_sf(alpha))  # E[Z | Z > alpha] for a standard normal
    ex = np.where(observed, x, mu + sigma * mills)
    ex2 = np.where(observed, x * x, mu * mu + sigma * sigma + sigma * mills * (x + mu))
    w = np.where(observed | censored, r, 0.0)
    total = w.sum()
    if total < 1e-9:
        return mu, sigma
    new_mu = float((w * ex).sum() / total)
    var = float((w * ex2).sum() / total) - new_mu * new_mu
    return new_mu, max(MIN_SIGMA, math.sqrt(max(var, 0.0)))


def _spread(values: np.ndarray) -> float:
    if len(values) < 4:
        return 0.5
    q1, q3 = np.percentile(values, [25, 75])
    return max(MIN_SIGMA, float(q3 - q1) / 1.349)


def _initial(
    log_t: np.ndarray, t_obs: np.ndarray, log_d: np.ndarray, d_obs: np.ndarray, components: int, censored: bool
) -> _Params:
    t = log_t[t_obs] if t_obs.any() else log_t
    d = log_d[d_obs] if d_obs.any() else np.array([math.log(0.02)])
    mt, st = float(np.median(t)), _spread(t)
    md, sd = float(np.median(d)), _spread(d)
    # The usual attempts, then ever slower kinds (the stragglers); a little hang mass if anything was cut off.
    slow = [math.log(4.0) * k for k in range(components)]
    weights = np.array([0.9] + [0.08 / max(1, components - 1)] * (components - 1) + [0.02 if censored else 0.0])
    return _Params(
        weights / weights.sum(),
        np.array([mt + s for s in slow]),
        np.array([st] * components),
        np.array([md + s / 2 for s in slow]),
        np.array([sd] * components),
    )


def _from(m: Mixture) -> _Params:
    return _Params(
        np.array([c.weight for c in m.components] + [m.hang]),
        np.array([c.ttft.mu for c in m.components]),
        np.array([c.ttft.sigma for c in m.components]),
        np.array([c.per_token.mu for c in m.components]),
        np.array([c.per_token.sigma for c in m.components]),
    )


__all__ = [
    "CENSORED",
    "MISSING",
    "OBSERVED",
    "Component",
    "LogNormal",
    "Mixture",
    "fit_mixture",
    "kaplan_meier",
    "km_quantile",
    "log_likelihood",
    "normal_quantile",
]
