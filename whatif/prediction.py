"""Predict a policy's hit rate, latency quantiles, extra tokens, cost and 429s from a trace.

`predict(trace, WhatIf(...))` fits the trace, replays it `replays` times under the changed policy
and reports each metric's mean over the replays with a 95% interval, beside what the trace itself
recorded. Replay 0 uses the fit of the whole trace; every other one a fit of a bootstrap resample of
the trace's runs (warm-started), so the interval covers both the replay's own randomness and how
much the trace can tell: it is where a batch of this many runs under the policy should land.

Metrics are the same for the trace and the replays:
* hit rate: runs delivered by their deadline / runs;
* p50 ... p99.9: run latency over every run the budget admitted (a failed run at the time it ended),
  nearest rank;
* extra tokens: tokens of attempts whose answer was not used (lost races, errors, invalid answers,
  cancellations, the runs that failed) over tokens of the answers that were;
* cost per delivered run; 429s (attempts refused by the provider's rate limit or quota);
* refused: runs the budget refused at submission.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, ErrorKind, FailureReason, RunOutcome
from tailrace.whatif.change import WhatIf, plan_for
from tailrace.whatif.fit import TraceFit, fit_trace
from tailrace.whatif.replay import AdmissionFactory, Part, Replay, ReplayPlan
from tailrace.whatif.survival import normal_quantile
from tailrace.whatif.trace_data import TraceData, read_trace

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
TAIL_RUNS = 10  # a quantile needs this many trace runs beyond it to be measured rather than extrapolated
_429_KINDS = frozenset({ErrorKind.RATE_LIMITED, ErrorKind.QUOTA_EXHAUSTED})


class Metrics(BaseModel):
    model_config = ConfigDict(frozen=True)

    runs: int
    delivered: int
    on_time: int
    hit_rate: float
    p50: float
    p90: float
    p99: float
    p999: float
    tokens: int
    extra_tokens: float  # fraction: tokens not used / tokens of the answers used
    cost_usd: float
    cost_per_delivered_usd: float
    rate_limited: int  # 429s
    refused: int  # budget_exhausted at submission
    failures: dict[str, int]

    def value(self, name: str) -> float:
        return float(getattr(self, name))


METRIC_NAMES = (
    "hit_rate",
    "p50",
    "p90",
    "p99",
    "p999",
    "extra_tokens",
    "cost_per_delivered_usd",
    "rate_limited",
    "refused",
)


class Estimate(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


class Prediction(BaseModel):
    model_config = ConfigDict(frozen=True)

    trace: str
    change: str  # what was changed, one line
    runs: int  # per replay
    replays: int
    recorded: Metrics  # what the trace itself recorded
    predicted: dict[str, Estimate]  # by metric name (METRIC_NAMES)
    samples: list[Metrics]  # each replay's metrics
    warnings: list[str]
    runs_per_cpu_s: float  # replay speed

    def __getitem__(self, metric: str) -> Estimate:
        return self.predicted[metric]


# ---- metrics ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunFacts:
    latency_s: float
    delivered: bool
    on_time: bool
    failure: str | None
    cost_usd: float
    used_tokens: int
    other_tokens: int
    rate_limited: int
    refused: bool


def _nearest_rank(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def _metrics(facts: Sequence[_RunFacts]) -> Metrics:
    lat = sorted(f.latency_s for f in facts if not f.refused)  # a run refused at submission never ran
    delivered = sum(f.delivered for f in facts)
    used = sum(f.used_tokens for f in facts)
    other = sum(f.other_tokens for f in facts)
    cost = sum(f.cost_usd for f in facts)
    n = max(1, len(facts))
    q = {name: _nearest_rank(lat, p) for name, p in QUANTILES}
    return Metrics(
        runs=len(facts),
        delivered=delivered,
        on_time=sum(f.on_time for f in facts),
        hit_rate=sum(f.on_time for f in facts) / n,
        p50=q["p50"],
        p90=q["p90"],
        p99=q["p99"],
        p999=q["p99.9"],
        tokens=used + other,
        extra_tokens=other / used if used else math.inf,
        cost_usd=cost,
        cost_per_delivered_usd=cost / delivered if delivered else math.inf,
        rate_limited=sum(f.rate_limited for f in facts),
        refused=sum(f.refused for f in facts),
        failures=dict(Counter(f.failure for f in facts if f.failure is not None)),
    )


def _is_429(a: AttemptRecord) -> bool:
    return a.error is not None and (a.error.status == 429 or a.error.kind in _429_KINDS)


def _facts(
    latency_s: float,
    delivered: bool,
    on_time: bool,
    failure: FailureReason | None,
    cost_usd: float,
    attempts: Iterable[tuple[AttemptRecord, bool]],
) -> _RunFacts:
    used = other = limited = 0
    count = 0
    for a, won in attempts:
        count += 1
        tokens = a.input_tokens + a.output_tokens
        if won and delivered:
            used += tokens
        else:
            other += tokens
        limited += _is_429(a)
    refused = failure == FailureReason.BUDGET_EXHAUSTED and count == 0
    return _RunFacts(
        latency_s, delivered, on_time, failure.value if failure else None, cost_usd, used, other, limited, refused
    )


def trace_metrics(data: TraceData) -> Metrics:
    """What the trace recorded."""
    return _metrics(
        [
            _facts(
                r.latency_s,
                r.delivered,
                r.on_time,
                r.failure,
                r.cost_usd,
                ((a, a.won) for a in data.attempts_of(r.run_id)),
            )
            for r in data.runs
        ]
    )


def outcome_metrics(outcomes: Sequence[RunOutcome]) -> Metrics:
    facts = []
    for o in outcomes:
        first: dict[str, AttemptRecord] = {}
        for a in o.attempts:
            if a.outcome == AttemptOutcome.VALID and (a.step_id not in first or a.ended_at < first[a.step_id].ended_at):
                first[a.step_id] = a
        won = {(s, a.attempt) for s, a in first.items()}
        attempts = ((a, (a.step_id, a.attempt) in won) for a in o.attempts)
        facts.append(_facts(o.latency_s, o.delivered, o.on_time, o.failure, o.cost_usd, attempts))
    return _metrics(facts)


# ---- predicting ---------------------------------------------------------------------------------------


def records_for(data: TraceData, runs: int) -> list[tuple[str, dict[str, Any]]]:
    """The trace's run inputs, in the order they ran; repeated (with fresh run ids) to make `runs`."""
    ordered = sorted(data.runs, key=lambda r: r.started_at)
    out = []
    for i in range(runs):
        r = ordered[i % len(ordered)]
        out.append((r.run_id if i < len(ordered) else f"{r.run_id}~{i // len(ordered)}", dict(r.inputs)))
    return out


def parts_for(data: TraceData, runs: int | None) -> list[Part]:
    """What to replay: the trace's own parts (its batches, with the pauses between them), or `runs`
    runs in one batch."""
    if runs is not None and runs != len(data.runs):
        return [Part(records_for(data, runs))]
    parts = []
    for segment, pause in data.segments():
        parts.append(Part([(r.run_id, dict(r.inputs)) for r in segment], pause))
    return parts


def replay_metrics(
    fit: TraceFit,
    plan: ReplayPlan,
    records: Sequence[tuple[str, dict[str, Any]]] | Sequence[Part],
    seed: int,
    admission: AdmissionFactory | None = None,
) -> tuple[Metrics, int]:
    replay = Replay(fit, plan, records, seed=seed, admission=admission)
    outcomes = replay.run()
    return outcome_metrics(outcomes), replay.provider.attempts


def predict(
    trace: str | Path | TraceData,
    change: WhatIf | None = None,
    *,
    runs: int | None = None,
    replays: int = 5,
    seed: int = 0,
    admission: AdmissionFactory | None = None,
    fit: TraceFit | None = None,
    jobs: int = 1,
) -> Prediction:
    """Replay the trace under `change` (None: its own policy) and say what to expect.

    `runs` per replay (default: as many as the trace has); `admission` is the driver's run admission
    for a budget (`tailrace.what_if` plugs in the cluster's; None: none). `fit` reuses a fit. `jobs`
    replays run in processes of their own at once (0: one per CPU).
    """
    data = trace if isinstance(trace, TraceData) else read_trace(trace)
    change = change or WhatIf()
    plan = plan_for(data, change)
    fit = fit or fit_trace(data)
    n = runs or len(data.runs)
    parts = parts_for(data, runs)
    tasks = [_Replica(data, fit, plan, parts, seed, r, admission) for r in range(max(1, replays))]
    done = in_processes(_replicate, tasks, jobs)
    samples = [metrics for metrics, _ in done]
    cpu = sum(seconds for _, seconds in done)
    return Prediction(
        trace=str(data.path),
        change=change.describe(),
        runs=n,
        replays=len(samples),
        recorded=trace_metrics(data),
        predicted={name: _estimate([m.value(name) for m in samples], name, n) for name in METRIC_NAMES},
        samples=samples,
        warnings=warnings_for(data, fit, n),
        runs_per_cpu_s=n * len(samples) / cpu if cpu > 0 else math.inf,
    )


@dataclass(frozen=True)
class _Replica:
    data: TraceData
    fit: TraceFit
    plan: ReplayPlan
    parts: list[Part]
    seed: int
    index: int
    admission: AdmissionFactory | None


def _replicate(task: _Replica) -> tuple[Metrics, float]:
    """One replay: 0 on the whole trace's fit, the others on a bootstrap resample's (warm-started)."""
    fit = task.fit if task.index == 0 else fit_trace(_bootstrap(task.data, task.seed + task.index), start=task.fit)
    started = time.process_time()
    metrics, _ = replay_metrics(fit, task.plan, task.parts, task.seed + 1000 * task.index, task.admission)
    return metrics, time.process_time() - started


T = TypeVar("T")
R = TypeVar("R")


def in_processes(fn: Callable[[T], R], tasks: Sequence[T], jobs: int) -> list[R]:
    """`[fn(t) for t in tasks]`, in up to `jobs` forked processes at once (0: one per CPU). Replays are
    independent and CPU-bound: processes, not threads."""
    jobs = (os.cpu_count() or 1) if jobs == 0 else jobs
    if jobs <= 1 or len(tasks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [fn(t) for t in tasks]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
        return list(pool.map(fn, tasks))


def _bootstrap(data: TraceData, seed: int) -> TraceData:
    import random

    rng = random.Random(seed)
    ids = [r.run_id for r in data.runs]
    return data.resample([rng.choice(ids) for _ in ids])


def _estimate(values: list[float], name: str, runs: int) -> Estimate:
    """The mean of the replays, and where one more batch like them lands, 95% (a t interval, within the
    metric's range). A hit rate's spread is at least a batch's binomial noise: a few replays that
    happen to agree say little about it."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return Estimate(mean=math.inf, low=min(values), high=math.inf)
    mean = statistics.fmean(values)
    var = statistics.variance(values) if len(values) > 1 else 0.0
    high = math.inf
    if name == "hit_rate":
        p = (mean * runs + 0.5) / (runs + 1)
        var = max(var, p * (1 - p) / runs)
        high = 1.0
    if var == 0.0:
        return Estimate(mean=mean, low=mean, high=mean)
    half = _t975(max(1, len(values) - 1)) * math.sqrt(var * (1 + 1 / len(values)))
    return Estimate(mean=mean, low=max(0.0, mean - half), high=min(high, mean + half))


def _t975(df: int) -> float:
    """Student's t 97.5% quantile (Cornish-Fisher expansion; within 0.3% for df >= 2)."""
    z = normal_quantile(0.975)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3 if df < 1000 else z


def warnings_for(data: TraceData, fit: TraceFit, runs: int) -> list[str]:
    out = list(data.notes) + list(fit.notes)
    n = len(data.runs)
    for name, q in QUANTILES:
        beyond = n * (1 - q)
        if beyond < TAIL_RUNS:
            out.append(
                f"{name} from a trace of {n} runs: {beyond:.1f} of its runs lie beyond it (want >= {TAIL_RUNS}); "
                "the prediction rests on the fitted tails, not on what was seen"
            )
        if runs * (1 - q) < 1:
            out.append(f"{name} of {runs} replayed runs is their slowest run: replay more runs (--runs) to see it")
    return out


__all__ = [
    "METRIC_NAMES",
    "Estimate",
    "Metrics",
    "Prediction",
    "in_processes",
    "outcome_metrics",
    "predict",
    "records_for",
    "replay_metrics",
    "trace_metrics",
]
