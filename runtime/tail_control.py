"""Tail control inside one step executor: the state hedging policies read, fed by what attempts do.

`TailControl` owns the executor's latency windows, circuit breakers and retry throttle, builds each
step's policy (one policy: hedging off and side-effect steps are configurations of it), and hears
every attempt start and end (it is the `StepRunner`'s observer) and every policy event. It turns all
of that into statistics and metrics. No Ray here beyond the lazy metrics helpers, so it is
tested as is.
"""

from __future__ import annotations

from tailrace.engine.clock import SYSTEM_CLOCK, Clock
from tailrace.engine.errors import TailraceError
from tailrace.engine.outcomes import RETRYABLE_KINDS, AttemptOutcome, AttemptRecord, CancelReason, StepResult
from tailrace.engine.specs import HedgeConfig, ModelChoice
from tailrace.engine.tokens import estimate_prompt_tokens
from tailrace.policies.attempts import AttemptPolicy
from tailrace.policies.breaker import STATE_VALUE, BreakerBoard, CircuitState
from tailrace.policies.hedging import HedgingPolicy, TailState, TailTuning, effective_config
from tailrace.policies.latency import LatencyStats, model_key
from tailrace.policies.throttle import ExtraTokenBudget, RetryThrottle, expected_attempt_tokens
from tailrace.runtime import metrics
from tailrace.runtime.step_runner import StepRequest, rendered_prompt

# Recorded when they end (stalled), or telling nothing about latency (a sibling's rejection).
_NOT_CENSORED = frozenset({CancelReason.STALLED, CancelReason.MODEL_REJECTED})
HEDGE_DELAY_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30]


class TailControl:
    def __init__(
        self, hedge: HedgeConfig | None = None, tuning: TailTuning | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.hedge = hedge or HedgeConfig()
        self.tuning = tuning or TailTuning()
        self._clock = clock
        self.stats = LatencyStats(self.tuning.latency, clock)
        self.breakers = BreakerBoard(self.tuning.breaker, on_change=self._circuit_changed)
        self.throttle = RetryThrottle(self.tuning.throttle)
        self.state = TailState(self.stats, self.breakers, self.throttle, events=self)

    # ---- policies -----------------------------------------------------------------------------------

    def policy_for(self, request: StepRequest) -> AttemptPolicy:
        step = request.step
        config = effective_config(self.hedge, step.hedge)
        return HedgingPolicy(
            step.models,
            config,
            self.state,
            step_id=step.id,
            side_effect=step.side_effect,
            max_attempts=request.max_attempts,
            time_share=request.time_share,
            budget=ExtraTokenBudget(request.extra_tokens),
            expected_tokens=[_expected_tokens(request, choice) for choice in step.models],
            on_content_policy=step.on_content_policy,
        )

    # ---- the runner's observer ----------------------------------------------------------------------

    def attempt_started(self, request: StepRequest, choice: ModelChoice, role: str) -> None:
        self.breakers.started(model_key(choice.provider, choice.model), self._clock.monotonic())

    def attempt_ended(self, request: StepRequest, record: AttemptRecord) -> None:
        key = model_key(record.provider, record.model)
        now = self._clock.monotonic()
        # Attempts and cancellations by outcome are counted once, in tailrace.runtime.run_metrics.
        if record.outcome in (AttemptOutcome.VALID, AttemptOutcome.INVALID):
            # An answer, valid or not: the provider is up, and how long it took is a latency sample.
            self.stats.observe(key, "ok", record.ttft_s, record.latency_s, _decode_rate(record))
            self.breakers.record(key, now, failed=False)
            self.throttle.record(key, failed=False)
        elif record.outcome == AttemptOutcome.ERROR:
            if record.error is not None and record.error.kind in RETRYABLE_KINDS:
                # A health failure (5xx, overload, rate limit, drop, timeout); never a latency sample.
                self.stats.observe(key, "fail")
                self.breakers.record(key, now, failed=True)
                self.throttle.record(key, failed=True)
        else:
            self._cancelled(key, request, record, now)

    def _cancelled(self, key: str, request: StepRequest, record: AttemptRecord, now: float) -> None:
        if record.cancel_reason == CancelReason.STALLED:
            # Killed by its timeout: censored (it took at least this long) and a health failure; a
            # model whose attempts all hang must not look healthy for want of finished events.
            no_token = record.ttft_s is None
            ttft = record.latency_s if no_token else record.ttft_s
            self.stats.observe(key, "censored", ttft, record.latency_s, ttft_censored=no_token, timed_out=True)
            self.breakers.record(key, now, failed=True)
            self.throttle.record(key, failed=True)
            return
        if record.cancel_reason == CancelReason.HEDGE_LOST:
            models = request.step.models
            prior = models[record.tier].expected_latency_s if record.tier < len(models) else None
            if self.stats.health(key, prior).unhealthy:
                # Lost the race while the model is slowed down or failing: a health failure, so a
                # brownout opens the circuit on every executor, not only on those whose attempts timed
                # out (primaries follow the circuit; the half-open probes keep its statistics current).
                self.breakers.record(key, now, failed=True)
            else:
                self.breakers.outrun(key, now)  # a half-open probe that lost the race: not back yet
            return
        self.breakers.abandoned(key, now)

    def step_ended(self, request: StepRequest, result: StepResult) -> None:
        winner = next((a for a in result.attempts if a.outcome == AttemptOutcome.VALID), None)
        if winner is not None and winner.role == "duplicate":
            metrics.count(
                "tailrace_duplicates_won_total", "Steps answered by a duplicate attempt.", {"model": winner.model}
            )
        for a in result.attempts:
            if a.outcome == AttemptOutcome.CANCELLED and a.cancel_reason not in _NOT_CENSORED:
                # Censored: it ran at least this long without answering (Kaplan-Meier takes it as that,
                # not as an answer). Dropping these would bias the window toward the fast answers
                # hedging leaves behind, and hide a slowed-down model.
                no_token = a.ttft_s is None
                ttft = a.latency_s if no_token else a.ttft_s
                self.stats.observe(
                    model_key(a.provider, a.model), "censored", ttft, a.latency_s, ttft_censored=no_token
                )

    # ---- the policies' events -----------------------------------------------------------------------

    def duplicate_sent(self, step_id: str, model: str, delay_s: float, trigger: str) -> None:
        metrics.count(
            "tailrace_duplicates_sent_total",
            "Duplicate attempts sent, by trigger.",
            {"model": model, "trigger": trigger},
        )
        metrics.observe(
            "tailrace_hedge_delay_seconds",
            "Time from an attempt's start to its duplicate's.",
            {"trigger": trigger},
            delay_s,
            HEDGE_DELAY_BUCKETS_S,
        )

    def refused(self, step_id: str, role: str, by: str) -> None:
        metrics.count(
            "tailrace_budget_exhausted_total",
            "Duplicates and retries a budget refused (the step waited on its running attempt).",
            {"role": role, "budget": by},
        )

    def degraded(self, step_id: str, model: str, tier: int, reason: str) -> None:
        metrics.count(
            "tailrace_degradations_total",
            "Attempts started below a step's first rung, by reason.",
            {"model": model, "reason": reason},
        )

    def _circuit_changed(self, key: str, state: CircuitState) -> None:
        metrics.gauge(
            "tailrace_circuit_state",
            "Circuit per model: 0 closed, 1 half-open, 2 open.",
            {"model": key},
            STATE_VALUE[state],
        )
        metrics.count(
            "tailrace_circuit_transitions_total",
            "Circuit state changes per model.",
            {"model": key, "state": state.value},
        )


def _decode_rate(record: AttemptRecord) -> float | None:
    """Tokens per second after the first token, for answers long enough to tell (a few chunks)."""
    if record.ttft_s is None or record.output_tokens < 16:
        return None
    streaming = record.latency_s - record.ttft_s
    return record.output_tokens / streaming if streaming > 0 else None


def _expected_tokens(request: StepRequest, choice: ModelChoice) -> int:
    """What one more attempt on this rung is expected to cost: its prompt and half its max_tokens."""
    try:
        system, prompt = rendered_prompt(request, choice)
    except TailraceError:
        return choice.max_tokens
    return expected_attempt_tokens(estimate_prompt_tokens(system, prompt), choice)


__all__ = ["TailControl"]
