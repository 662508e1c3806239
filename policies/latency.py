"""Per-model sliding windows of observed time to first token, total latency and failures.

What the hedging policy reads: a model's TTFT and latency quantiles (its own prior, from the spec, while
the model is cold), and its health (recent failure rate, recent latency shifted up against the window).
Windows are bounded in time (old samples expire) and in count (a busy model keeps the newest).

Samples are stamped with the wall clock (epoch seconds), so windows from executors on different nodes
merge: `take_new()` hands out what this process observed since the last call, `merge()` adds what
others observed (the stats actor relays them). Fast failures are not latency samples: an error that
comes back in 50 ms says nothing about how long an answer takes, so it only counts as a failure.
An attempt cancelled before it answered (hedge lost, timed out, cut by the deadline) is a *censored*
sample: its latency (and, without a first token, its TTFT) is at least its age. Quantiles are
Kaplan-Meier estimates over answers and censored samples together, so a hung attempt never enters
the window as if it had answered at the moment it was given up on, and the window is not biased
toward the fast answers hedging leaves behind either. An attempt our own timeout killed also
counts as a failure for health: a model whose attempts all hang is not healthy.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tailrace.engine.clock import Clock
from tailrace.engine.specs import ModelChoice

Kind = Literal["ok", "fail", "censored"]
Metric = Literal["ttft", "latency", "tokens_per_s"]


@dataclass(frozen=True)
class Sample:
    at: float  # wall-clock epoch seconds when the attempt ended
    kind: Kind  # ok: answered (valid or not); fail: provider failure; censored
    ttft_s: float | None = None  # for censored: a lower bound when `ttft_censored`
    latency_s: float | None = None  # for censored: a lower bound
    tokens_per_s: float | None = None  # decode rate after the first token (answered attempts)
    ttft_censored: bool = False  # censored before its first token
    timed_out: bool = False  # censored by our own attempt timeout: also a health failure


Snapshot = dict[str, list[Sample]]  # model key -> samples; what executors exchange


def model_key(provider: str, model: str) -> str:
    """Windows are per provider and model: the same model name behind two accounts can differ."""
    return f"{provider}/{model}"


class LatencyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(default=60.0, gt=0)  # samples older than this expire
    max_samples: int = Field(default=512, ge=8)  # per model; the newest are kept
    min_samples: int = Field(default=20, ge=1)  # fewer latency samples: the model is cold
    recent_s: float = Field(default=10.0, gt=0)  # "recent" for health: failure rate, latency shift
    min_recent: int = Field(default=4, ge=1)  # recent events needed before health is judged
    shift_factor: float = Field(default=1.6, gt=1)  # recent median this much above the window's: shifted
    unhealthy_failure_rate: float = Field(default=0.25, gt=0, le=1)
    # Cold: hedge triggers use the prior times this (conservative: later), fits use the prior as is.
    cold_trigger_factor: float = Field(default=1.5, ge=1)

    def scaled(self, factor: float) -> LatencyConfig:
        """The same config on a clock `factor` times faster or slower (e.g. a time-scaled simulator)."""
        return self.model_copy(update={"window_s": self.window_s * factor, "recent_s": self.recent_s * factor})


@dataclass(frozen=True)
class Health:
    failure_rate: float  # over the recent window, among answered + failed attempts
    events: int  # answered + failed attempts in the recent window
    shifted: bool  # recent latency well above the window's
    unhealthy: bool  # failing or shifted: duplicates go elsewhere

    @classmethod
    def unknown(cls) -> Health:
        return cls(0.0, 0, False, False)


def _ended_at(s: Sample) -> float:
    return s.at


_NO_CURVE = np.zeros(0)


def _entries(s: Sample) -> list[tuple[Metric, tuple[float, int]]]:
    """What one sample adds to each metric's sorted values: (value, 0) for an observed time, (value, 1) for
    a lower bound (censored), so answers sort before bounds at the same value. Fast failures add nothing."""
    if s.kind == "fail":
        return []
    out: list[tuple[Metric, tuple[float, int]]] = []
    if s.ttft_s is not None:
        out.append(("ttft", (s.ttft_s, int(s.kind == "censored" and s.ttft_censored))))
    if s.latency_s is not None:
        out.append(("latency", (s.latency_s, int(s.kind != "ok"))))
    if s.kind == "ok" and s.tokens_per_s is not None:
        out.append(("tokens_per_s", (s.tokens_per_s, 0)))
    return out


class ModelWindow:
    """One model's samples, oldest first, with each metric's values kept sorted as samples come and go
    (the hedging policy reads quantiles several times per attempt; re-sorting per change cost ms a step)."""

    def __init__(self, config: LatencyConfig) -> None:
        self._config = config
        self._samples: deque[Sample] = deque(maxlen=config.max_samples)
        self._sorted: dict[Metric, list[tuple[float, int]]] = {"ttft": [], "latency": [], "tokens_per_s": []}
        self._censored: dict[Metric, int] = {"ttft": 0, "latency": 0, "tokens_per_s": 0}
        # Each metric's lower-bound flags, in step with `_sorted` (what the Kaplan-Meier curve is built from).
        self._bounds: dict[Metric, list[int]] = {"ttft": [], "latency": [], "tokens_per_s": []}
        self._curves: dict[Metric, tuple[np.ndarray, float | None]] = {}
        self._timed_out: dict[Metric, float | None] = {}
        # The last health answer, until a sample comes or goes (a replay asks thousands of times a second).
        self._health: tuple[float, float, float | None, Health] | None = None

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample: Sample) -> None:
        samples = self._samples
        full = len(samples) == self._config.max_samples
        if samples and sample.at < samples[-1].at:
            # Merged samples can arrive out of order; keep the deque sorted by time so expiry stays O(1).
            at = bisect.bisect_right(samples, sample.at, key=_ended_at)
            if full:
                if at == 0:
                    return  # older than every sample of a full window: the newest are kept
                self._forget(samples.popleft())
                at -= 1
            samples.insert(at, sample)
        else:
            if full:
                self._forget(samples[0])  # the deque drops it on append
            samples.append(sample)
        self._remember(sample)
        self._changed()

    def expire(self, now_epoch: float) -> None:
        horizon = now_epoch - self._config.window_s
        while self._samples and self._samples[0].at < horizon:
            self._forget(self._samples.popleft())
            self._changed()

    def _changed(self) -> None:
        self._curves = {}
        self._timed_out = {}
        self._health = None

    def _remember(self, sample: Sample) -> None:
        for metric, entry in _entries(sample):
            values = self._sorted[metric]
            at = bisect.bisect_right(values, entry)
            values.insert(at, entry)
            self._bounds[metric].insert(at, entry[1])
            self._censored[metric] += entry[1]

    def _forget(self, sample: Sample) -> None:
        for metric, entry in _entries(sample):
            values = self._sorted[metric]
            at = bisect.bisect_left(values, entry)
            del values[at]
            del self._bounds[metric][at]
            self._censored[metric] -= entry[1]

    def quantile(self, metric: Metric, q: float) -> float | None:
        """The q-quantile by Kaplan-Meier over answers and censored samples; None while the window holds
        fewer than `min_samples` answers. When censoring hides the quantile (more than 1 - q of the
        window still running when given up on), the largest value seen: a lower bound."""
        curve = self._curves.get(metric)
        if curve is None:
            curve = self._curves[metric] = self._curve(metric)
        cdf, largest = curve
        if largest is None:
            return None
        # The distribution function only rises at answers, so the first value where it reaches q is one.
        i = int(cdf.searchsorted(q - 1e-12, side="left"))
        values = self._sorted[metric]
        while i < len(values) and values[i][1]:
            i += 1  # q ~ 0 only: skip lower bounds before the first answer
        return values[i][0] if i < len(values) else largest

    def timed_out_bound(self, metric: Metric) -> float | None:
        """The longest the metric ran in an attempt the engine gave up on (killed by its timeout), or None.
        While the window is cold this is all it knows beyond the prior: the value is at least this."""
        if metric not in self._timed_out:
            bounds = [
                value
                for s in self._samples
                if s.timed_out
                for m, (value, censored) in _entries(s)
                if m == metric and censored
            ]
            self._timed_out[metric] = max(bounds, default=None)
        return self._timed_out[metric]

    def _curve(self, metric: Metric) -> tuple[np.ndarray, float | None]:
        """The Kaplan-Meier distribution function after each of the metric's sorted values (a lower bound
        leaves it as it was), and the largest value seen (None while the window holds fewer than
        `min_samples` answers). Vectorised: the policy asks after every new sample, over up to
        `max_samples` values."""
        values = self._sorted[metric]
        if len(values) - self._censored[metric] < self._config.min_samples:
            return _NO_CURVE, None
        bounds = np.array(self._bounds[metric], dtype=bool)
        at_risk = np.arange(len(values), 0, -1, dtype=np.float64)
        factors = np.where(bounds, 1.0, 1.0 - 1.0 / at_risk)
        return 1.0 - np.cumprod(factors), values[-1][0]

    def health(self, now_epoch: float, prior_latency_s: float | None = None) -> Health:
        """Failure rate and latency shift over the recent window. The latency baseline is the window's
        median, or the model's prior when that is lower: a brownout longer than the window would
        otherwise become the new normal."""
        cached = self._health
        if cached is not None and cached[0] <= now_epoch < cached[1] and cached[2] == prior_latency_s:
            return cached[3]
        c = self._config
        baselines = [b for b in (self.quantile("latency", 0.5), prior_latency_s) if b is not None]
        baseline = min(baselines) if baselines else None
        # A censored sample is a lower bound: it tells only when it is already above the threshold.
        limit = math.inf if baseline is None else c.shift_factor * baseline
        answered = failed = 0
        recent_lat: list[float] = []
        start = bisect.bisect_left(self._samples, now_epoch - c.recent_s, key=_ended_at)  # samples are time-sorted
        for s in itertools.islice(self._samples, start, None):
            if s.kind == "ok":
                answered += 1
            elif s.kind == "fail" or s.timed_out:
                failed += 1
            if s.latency_s is not None and (s.kind == "ok" or (s.kind == "censored" and s.latency_s > limit)):
                recent_lat.append(s.latency_s)
        events = answered + failed
        rate = failed / events if events else 0.0
        shifted = False
        if baseline is not None and len(recent_lat) >= c.min_recent:
            recent_lat.sort()
            shifted = recent_lat[len(recent_lat) // 2] > limit
        failing = events >= c.min_recent and rate >= c.unhealthy_failure_rate
        health = Health(rate, events, shifted, failing or shifted)
        # Until a sample comes or goes (which clears this), the answer changes only when the oldest recent
        # sample leaves the recent window.
        until = self._samples[start].at + c.recent_s if start < len(self._samples) else math.inf
        self._health = (now_epoch, until, prior_latency_s, health)
        return health

    def samples(self) -> list[Sample]:
        return list(self._samples)


class LatencyStats:
    """Every model's window in one process. Time is read from the injected clock (fake in tests)."""

    def __init__(self, config: LatencyConfig | None, clock: Clock) -> None:
        self.config = config or LatencyConfig()
        self._clock = clock
        self._windows: dict[str, ModelWindow] = {}
        self._new: Snapshot = {}  # observed here, not yet handed to the stats actor

    def _window(self, model: str) -> ModelWindow:
        window = self._windows.get(model)
        if window is None:
            window = self._windows[model] = ModelWindow(self.config)
        window.expire(self._clock.time())
        return window

    # ---- observing ----------------------------------------------------------------------------------

    def observe(
        self,
        model: str,
        kind: Kind,
        ttft_s: float | None = None,
        latency_s: float | None = None,
        tokens_per_s: float | None = None,
        *,
        ttft_censored: bool = False,
        timed_out: bool = False,
    ) -> None:
        """Record one attempt's end, observed in this process."""
        sample = Sample(self._clock.time(), kind, ttft_s, latency_s, tokens_per_s, ttft_censored, timed_out)
        self._window(model).add(sample)
        self._new.setdefault(model, []).append(sample)

    def take_new(self) -> Snapshot:
        """Samples observed here since the last call (to push to the shared stats)."""
        new, self._new = self._new, {}
        return new

    def merge(self, snapshot: Mapping[str, Iterable[Sample]]) -> None:
        """Add samples observed elsewhere; expired ones are dropped on the way in."""
        horizon = self._clock.time() - self.config.window_s
        for model, samples in snapshot.items():
            window = self._window(model)
            for s in samples:
                if s.at >= horizon:
                    window.add(s)

    def snapshot(self) -> Snapshot:
        """Every live sample, per model."""
        return {model: self._window(model).samples() for model in list(self._windows)}

    # ---- reading ------------------------------------------------------------------------------------

    def count(self, model: str) -> int:
        return len(self._window(model))

    def quantile(self, model: str, metric: Metric, q: float) -> float | None:
        return self._window(model).quantile(metric, q)

    def ttft_s(self, choice: ModelChoice, q: float, *, trigger: bool = True) -> float:
        """The q-quantile of `choice`'s TTFT; cold: the spec's prior (times the cold factor for triggers),
        raised to the longest wait the engine has given up on (see `_cold`)."""
        return self._quantile_or_prior(choice, "ttft", q, choice.expected_ttft_s, trigger)

    def latency_s(self, choice: ModelChoice, q: float, *, trigger: bool = True) -> float:
        return self._quantile_or_prior(choice, "latency", q, choice.expected_latency_s, trigger)

    def _quantile_or_prior(self, choice: ModelChoice, metric: Metric, q: float, prior: float, trigger: bool) -> float:
        window = self._window(model_key(choice.provider, choice.model))
        value = window.quantile(metric, q)
        if value is not None:
            return value
        prior *= self.config.cold_trigger_factor if trigger else 1.0
        if not trigger:
            return prior
        # Karn's backoff: an attempt killed at its timeout says only that the prior was too short. A cold
        # model whose attempts all time out (an optimistic prior, or an engine too busy to read answers)
        # would otherwise be killed at the same point forever and never answer: each timeout moves the
        # trigger to where it fired, so the next timeout (timeout_factor x trigger) comes later.
        waited = window.timed_out_bound(metric)
        return prior if waited is None else max(prior, waited)

    def decode_rate(self, choice: ModelChoice, q: float = 0.5) -> float | None:
        """The q-quantile of `choice`'s decode rate (tokens/s after the first token); None while cold."""
        return self.quantile(model_key(choice.provider, choice.model), "tokens_per_s", q)

    def health(self, model: str, prior_latency_s: float | None = None) -> Health:
        if model not in self._windows:
            return Health.unknown()
        return self._window(model).health(self._clock.time(), prior_latency_s)
