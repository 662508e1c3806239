"""Fit, from one trace, what each model does to an attempt: what the sampled provider replays.

Per model (provider/model):
* latency: time to first token and per-token decode time, a censored mixture (`survival.fit_mixture`:
  the usual attempts, the stragglers, and hangs), with every cancelled attempt a censored sample;
* errors: the rate of each error kind, and the recorded errors themselves (latency, status,
  retry-after), replayed as they came;
* time: when the model was degraded (a brownout: slower, failing more), a two-state hidden Markov
  model over its attempts in time order (`regimes.find_regime`); the latency fit is of the normal
  state (degraded attempts deflated by their factors), and the replay plays the degraded intervals
  at the same times of the batch, so a brownout stays a brownout.

Per step and model: the rate and kinds of invalid answers, output tokens of valid answers, input
tokens. Per workflow: the engine's own gaps (the driver's dispatch before a step's first attempt,
between a step and the next, and after the last), taken from the trace as they were.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from tailrace.engine.dag import Dag
from tailrace.engine.outcomes import AttemptOutcome, ErrorKind
from tailrace.engine.specs import ModelChoice, WorkflowSpec
from tailrace.policies.latency import model_key
from tailrace.whatif.regimes import Attempts, Regime, find_regime
from tailrace.whatif.survival import (
    CENSORED,
    MISSING,
    OBSERVED,
    Component,
    LogNormal,
    Mixture,
    fit_mixture,
)
from tailrace.whatif.trace_data import TraceAttempt, TraceData

ANSWERED = (AttemptOutcome.VALID, AttemptOutcome.INVALID)
STEP_PRIOR = 20.0  # pseudo-answers pulling a step's invalid rate toward the model's
MIN_SAMPLES = 20  # fewer output-token samples for a (step, model): pool wider
PRIOR_SIGMA = 0.5  # spread assumed for a model the trace never answered from (its spec's prior)
DEFAULT_PER_TOKEN_S = 0.02
MAX_CHUNKS = 20  # an answer streams in at most this many chunks ...
TOKENS_PER_CHUNK = 8  # ... of about this many tokens (what the simulator sends; providers send smaller ones)
MIN_DECODE_TOKENS = 16  # an answer streaming fewer tokens after its first chunk says little about decode time
COLD_ITERATIONS, WARM_ITERATIONS = 300, 60  # EM steps at most, from scratch and from an earlier fit


def stream_chunks(tokens: int, max_chunks: int = MAX_CHUNKS) -> int:
    """How many chunks an answer of `tokens` streams in (0 for an empty one)."""
    return max(1, min(max_chunks, math.ceil(tokens / TOKENS_PER_CHUNK))) if tokens > 0 else 0


def decode_tokens(tokens: int, max_chunks: int = MAX_CHUNKS) -> float:
    """The tokens that stream after the first chunk: what an answer's time from first token to end is
    made of. The fit divides that time by it and the sampled provider multiplies by it, so a trace's
    decode times come back whatever the provider's chunking."""
    chunks = stream_chunks(tokens, max_chunks)
    return tokens * (chunks - 1) / chunks if chunks else 0.0


@dataclass(frozen=True)
class ErrorDraw:
    """One recorded error, replayed as it came."""

    kind: ErrorKind
    retryable: bool
    status: int | None
    retry_after_s: float | None
    latency_s: float
    ttft_s: float | None
    message: str


@dataclass
class ModelFit:
    key: str
    latency: Mixture
    error_rate: dict[ErrorKind, float]
    errors: dict[ErrorKind, list[ErrorDraw]]
    regime: Regime
    invalid_token_ratio: dict[str, list[float]]  # invalid kind -> output tokens / max_tokens, as recorded
    attempts: int = 0
    answered: int = 0
    censored: int = 0
    from_prior: bool = False  # never answered in the trace: the spec's latency prior stands in


@dataclass
class StepModelFit:
    invalid_rate: float
    invalid_kinds: dict[str, float]  # kind -> probability, given an invalid answer
    output_tokens: list[int]  # of valid answers
    input_tokens: list[int]
    answered: int = 0


@dataclass
class Gaps:
    """The engine's own time around steps (dispatch hops, the driver's loop), as the trace recorded it."""

    first: list[float]  # run start -> a root step's first attempt
    between: list[float]  # a step's dependencies answered -> its first attempt
    finish: list[float]  # the last step answered -> the run's end


@dataclass
class TraceFit:
    workflow: WorkflowSpec
    span_s: float
    models: dict[str, ModelFit]
    steps: dict[tuple[str, str], StepModelFit]
    gaps: Gaps
    notes: list[str] = field(default_factory=list)

    def model(self, key: str) -> ModelFit:
        return self.models[key]


# ---- the invalid kinds the validator reports ---------------------------------------------------------


def invalid_kind(reason: str | None) -> str:
    """The kind of a validator reason: `schema: $.x: ...` -> `schema`, `missing_id: ticket_id` stays."""
    if not reason:
        return "incomplete"
    if reason.startswith(("schema:", "validator:")):
        return reason.split(":", 1)[0]
    if reason == "too_short":
        return "empty"
    return reason


# ---- fitting ----------------------------------------------------------------------------------------


def fit_trace(data: TraceData, start: TraceFit | None = None) -> TraceFit:
    """Everything the sampled provider needs, from one trace. `start` warm-starts the latency fits
    (bootstrap refits of the same trace)."""
    workflow = data.workflow
    span = data.span_s
    by_model: dict[str, list[TraceAttempt]] = defaultdict(list)
    for a in data.attempts:
        by_model[model_key(a.provider, a.model)].append(a)
    steps = _fit_steps(workflow, data.attempts)
    expected_tokens = _expected_tokens(workflow, steps)
    models: dict[str, ModelFit] = {}
    notes: list[str] = []
    for choice in _choices(workflow):
        key = model_key(choice.provider, choice.model)
        if key in models:
            continue
        attempts = sorted(by_model.get(key, []), key=lambda a: data.elapsed(a.started_at, a.run_id))
        warm = start.models.get(key) if start is not None else None
        if not any(a.outcome in ANSWERED for a in attempts):
            models[key] = _prior_fit(key, choice, attempts, span)
            notes.append(
                f"{key} never answered in the trace: its latency is the workflow's prior "
                f"(ttft {choice.expected_ttft_s:g} s, latency {choice.expected_latency_s:g} s)"
            )
            continue
        models[key] = _fit_model(key, attempts, data, span, expected_tokens, warm)
    return TraceFit(workflow, span, models, steps, _fit_gaps(data), notes)


def _choices(workflow: WorkflowSpec) -> list[ModelChoice]:
    return [m for s in workflow.steps for m in s.models]


def _fit_model(
    key: str,
    attempts: list[TraceAttempt],
    data: TraceData,
    span: float,
    expected_tokens: dict[tuple[str, str], float],
    warm: ModelFit | None,
) -> ModelFit:
    """`attempts` in the order they started."""
    errors: dict[ErrorKind, list[ErrorDraw]] = defaultdict(list)
    for a in attempts:
        if _is_error(a) and a.error is not None:
            errors[a.error.kind].append(
                ErrorDraw(
                    a.error.kind,
                    a.error.retryable,
                    a.error.status,
                    a.error.retry_after_s,
                    a.latency_s,
                    a.ttft_s,
                    a.error.message,
                )
            )
    # An attempt cancelled before errors usually come cannot say whether it would have failed.
    error_times = sorted(d.latency_s for ds in errors.values() for d in ds)
    early = error_times[len(error_times) // 2] if error_times else 0.0
    eligible = np.array([a.outcome != AttemptOutcome.CANCELLED or a.latency_s >= early for a in attempts])
    error_rate = {kind: len(ds) / max(1, int(eligible.sum())) for kind, ds in errors.items()}

    obs = _observations(attempts, key, expected_tokens)
    timeline = Attempts(
        np.array([data.elapsed(a.started_at, a.run_id) for a in attempts]),
        [a.error.kind if _is_error(a) and a.error is not None else None for a in attempts],
        eligible,
        obs.log_t,
        obs.t_state,
        obs.log_d,
        obs.d_state,
    )
    latency = obs.t_state != MISSING
    mixture = warm.latency if warm is not None else None

    def refit(states: np.ndarray, regime: Regime, iterations: int) -> Mixture:
        """The normal state's latency: attempts in the degraded state deflated by its factors."""
        shift_t = np.where(states == 1, math.log(regime.ttft_factor[1]), 0.0)[latency]
        shift_d = np.where(states == 1, math.log(regime.token_factor[1]), 0.0)[latency]
        return fit_mixture(
            obs.log_t[latency] - shift_t,
            obs.t_state[latency],
            obs.log_d[latency] - shift_d,
            obs.d_state[latency],
            start=mixture,
            iterations=iterations,
        )

    if warm is not None:
        # A refit of the same trace (a bootstrap replica): the regime found on the whole trace stands.
        regime = warm.regime
        states = np.array([regime.state_at(t) for t in timeline.times], dtype=int)
        mixture = refit(states, regime, WARM_ITERATIONS)
        regime = _with_error_rates(regime, error_rate) if not regime.intervals else regime
    else:
        regime, states = Regime.steady(span, error_rate), np.zeros(len(attempts), dtype=int)
        for _ in range(2):  # the normal state's fit from deflated attempts, the regime from that fit
            mixture = refit(states, regime, COLD_ITERATIONS)
            regime, states = find_regime(timeline, mixture, span)
            if not regime.intervals:
                break
        if regime.intervals:
            mixture = refit(states, regime, WARM_ITERATIONS)
    assert mixture is not None
    invalid_ratio: dict[str, list[float]] = defaultdict(list)
    for a in attempts:
        if a.outcome == AttemptOutcome.INVALID and a.request is not None and a.request.max_tokens > 0:
            invalid_ratio[invalid_kind(a.invalid_reason)].append(a.output_tokens / a.request.max_tokens)
    return ModelFit(
        key,
        mixture,
        error_rate,
        dict(errors),
        regime,
        dict(invalid_ratio),
        attempts=len(attempts),
        answered=sum(1 for a in attempts if a.outcome in ANSWERED),
        censored=int((obs.t_state == CENSORED).sum() + (obs.d_state == CENSORED).sum()),
    )


def _with_error_rates(regime: Regime, rates: dict[ErrorKind, float]) -> Regime:
    return Regime(regime.span_s, regime.intervals, regime.ttft_factor, regime.token_factor, (dict(rates), dict(rates)))


def _is_error(a: TraceAttempt) -> bool:
    """A provider error that is its own draw; a client timeout is a censored latency instead."""
    return a.outcome == AttemptOutcome.ERROR and a.error is not None and a.error.kind != ErrorKind.TIMEOUT


@dataclass
class _Observations:
    attempts: list[TraceAttempt]
    log_t: np.ndarray
    t_state: np.ndarray
    log_d: np.ndarray
    d_state: np.ndarray


def _observations(
    attempts: list[TraceAttempt], key: str, expected_tokens: dict[tuple[str, str], float]
) -> _Observations:
    """Each attempt as (time to first token, per-token time), each observed, censored or missing (an error).

    Answers give both (an empty answer: its first token is its end, no decode time). A cancelled
    attempt (lost race, deadline, failed run), or one the client timed out, gives a lower bound: on
    its first token when none came, else on its decode time (its elapsed streaming over the tokens
    its step's answers usually have). Errors are another draw (`error_rate`) and say nothing here.
    """
    kept, log_t, t_state, log_d, d_state = [], [], [], [], []
    for a in attempts:
        timed_out = a.outcome == AttemptOutcome.ERROR and a.error is not None and a.error.kind == ErrorKind.TIMEOUT
        if a.outcome in ANSWERED:
            ttft = a.ttft_s if a.ttft_s is not None else a.latency_s
            t, ts = ttft, OBSERVED
            streaming = a.latency_s - ttft
            after_first = decode_tokens(a.output_tokens)
            if after_first >= MIN_DECODE_TOKENS and streaming > 0:
                d, ds = streaming / after_first, OBSERVED
            else:
                d, ds = DEFAULT_PER_TOKEN_S, MISSING
        elif a.outcome == AttemptOutcome.CANCELLED or timed_out:
            if a.ttft_s is None:
                t, ts, d, ds = a.latency_s, CENSORED, DEFAULT_PER_TOKEN_S, MISSING
            else:
                t, ts = a.ttft_s, OBSERVED
                after_first = decode_tokens(round(expected_tokens.get((a.step_id, key), 0.0)))
                streaming = a.latency_s - a.ttft_s
                if after_first >= MIN_DECODE_TOKENS and streaming > 0:
                    d, ds = streaming / after_first, CENSORED
                else:
                    d, ds = DEFAULT_PER_TOKEN_S, MISSING
        else:  # an error: another draw, nothing to say about latency
            t, ts, d, ds = 1.0, MISSING, DEFAULT_PER_TOKEN_S, MISSING
        kept.append(a)
        log_t.append(math.log(max(t, 1e-6)))
        t_state.append(ts)
        log_d.append(math.log(max(d, 1e-9)))
        d_state.append(ds)
    return _Observations(kept, np.array(log_t), np.array(t_state), np.array(log_d), np.array(d_state))


def _prior_fit(key: str, choice: ModelChoice, attempts: list[TraceAttempt], span: float) -> ModelFit:
    """A model the trace never saw answer: its spec's latency prior, lognormal with a typical spread."""
    per_token = max(1e-4, (choice.expected_latency_s - choice.expected_ttft_s) / max(1.0, choice.max_tokens / 2))
    latency = Mixture(
        (
            Component(
                1.0,
                LogNormal(math.log(choice.expected_ttft_s), PRIOR_SIGMA),
                LogNormal(math.log(per_token), PRIOR_SIGMA),
            ),
        ),
        0.0,
    )
    return ModelFit(key, latency, {}, {}, Regime.steady(span, {}), {}, attempts=len(attempts), from_prior=True)


def _fit_steps(workflow: WorkflowSpec, attempts: list[TraceAttempt]) -> dict[tuple[str, str], StepModelFit]:
    answered: dict[tuple[str, str], list[TraceAttempt]] = defaultdict(list)
    for a in attempts:
        if a.outcome in ANSWERED:
            answered[(a.step_id, model_key(a.provider, a.model))].append(a)
    per_model: dict[str, list[TraceAttempt]] = defaultdict(list)
    for (_, key), items in answered.items():
        per_model[key].extend(items)
    model_rate = {k: _invalid_share(v) for k, v in per_model.items()}
    out = {}
    for step in workflow.steps:
        for choice in step.models:
            key = model_key(choice.provider, choice.model)
            items = answered.get((step.id, key), [])
            invalid = [a for a in items if a.outcome == AttemptOutcome.INVALID]
            prior = model_rate.get(
                key, _invalid_share([a for (s, _), v in answered.items() if s == step.id for a in v])
            )
            rate = (len(invalid) + STEP_PRIOR * prior) / (len(items) + STEP_PRIOR)
            kinds = Counter(invalid_kind(a.invalid_reason) for a in invalid)
            if not kinds:  # no invalid answer here: the kinds this model (or step) gave elsewhere
                pool = [a for a in per_model.get(key, []) if a.outcome == AttemptOutcome.INVALID]
                kinds = Counter(invalid_kind(a.invalid_reason) for a in pool) or Counter({"empty": 1})
            total = sum(kinds.values())
            out[(step.id, key)] = StepModelFit(
                rate,
                {k: v / total for k, v in kinds.items()},
                [a.output_tokens for a in items if a.outcome == AttemptOutcome.VALID],
                [a.input_tokens for a in items if a.usage_reported],
                len(items),
            )
    _pool_tokens(out)
    return out


def _invalid_share(items: list[TraceAttempt]) -> float:
    return sum(1 for a in items if a.outcome == AttemptOutcome.INVALID) / len(items) if items else 0.0


def _pool_tokens(steps: dict[tuple[str, str], StepModelFit]) -> None:
    """A (step, model) with few token samples of its own also draws from the step's other models', else
    from the model's other steps' (whichever has enough; the trace's own samples, never pooled ones)."""
    own = {k: (list(f.output_tokens), list(f.input_tokens)) for k, f in steps.items()}
    for (step_id, key), fit in steps.items():
        for i, attr in enumerate(("output_tokens", "input_tokens")):
            mine = own[(step_id, key)][i]
            if len(mine) >= MIN_SAMPLES:
                continue
            same_step = [x for (s, _), v in own.items() if s == step_id for x in v[i]]
            same_model = [x for (_, k), v in own.items() if k == key for x in v[i]]
            wider = next((p for p in (same_step, same_model) if len(p) >= MIN_SAMPLES), same_step or same_model)
            setattr(fit, attr, mine + wider)


def _expected_tokens(
    workflow: WorkflowSpec, steps: dict[tuple[str, str], StepModelFit]
) -> dict[tuple[str, str], float]:
    out = {}
    for step in workflow.steps:
        for choice in step.models:
            key = model_key(choice.provider, choice.model)
            tokens = steps[(step.id, key)].output_tokens
            out[(step.id, key)] = float(statistics.median(tokens)) if tokens else choice.max_tokens / 2
    return out


def _fit_gaps(data: TraceData) -> Gaps:
    dag = Dag.from_spec(data.workflow)
    first, between, finish = [], [], []
    for run in data.runs:
        attempts = data.attempts_of(run.run_id)
        if not attempts:
            continue
        start = {}
        for a in attempts:
            start[a.step_id] = min(start.get(a.step_id, math.inf), a.started_at)
        answered = {a.step_id: a.ended_at for a in attempts if a.won}
        for step in data.workflow.steps:
            if step.id not in start:
                continue
            if not step.depends_on:
                first.append(max(0.0, start[step.id] - run.started_at))
            elif all(d in answered for d in step.depends_on):
                between.append(max(0.0, start[step.id] - max(answered[d] for d in step.depends_on)))
        sinks = dag.sinks()
        if run.delivered and all(s in answered for s in sinks):
            finish.append(max(0.0, run.ended_at - max(answered[s] for s in sinks)))
    return Gaps(first or [0.0], between or [0.0], finish or [0.0])


__all__ = [
    "ErrorDraw",
    "Gaps",
    "ModelFit",
    "StepModelFit",
    "TraceFit",
    "fit_trace",
    "invalid_kind",
]
