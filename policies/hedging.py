"""The hedging policy: when a step's next attempt starts, on which rung of its ladder, in what role.

In the spirit of Finagle's BackupRequestFilter, gRPC hedging and trio's happy eyeballs:

* A duplicate starts when the newest running attempt has no first token by its model's TTFT quantile,
  no complete answer by its latency quantile, its stream has been silent for `stall_gap_s`, or it
  streams far slower than its model's median decode rate (a straggler that started in time).
  Both keep running; the first *valid* answer wins (the runner cancels the rest).
* A failed or invalid attempt, with nothing else running, starts the next one at once (after the
  provider's retry-after when it names one and that still fits). An invalid answer, an overloaded or
  rate-limited model go down the ladder first; other transient errors retry the same model once.
* Where a duplicate (or a retry) goes: the same model while it is healthy; the next rung (another
  model, with its own prompt variant) when the model's circuit is open, it keeps failing, its recent
  latency has shifted up, or its retries are throttled. Hedging into a browned-out model does not
  help. Primaries keep going to a model whose circuit is closed, so its statistics stay current.
* Deadline-aware ladder: a rung is chosen only if its latency quantile fits in the step's share of
  the time left (see `tailrace.policies.allocation`); otherwise the policy drops to a faster rung on purpose
  (the step's result records the tier that answered).
* Budgets: a duplicate needs the run's extra-token allowance and the target model's retry throttle;
  a retry needs the throttle and something left of the allowance. A refusal is recorded and the
  step waits on its running attempt instead; the policy remembers it, so it does not ask again.
* Side-effect steps are never duplicated (their retries carry the idempotency key).

Pure: no clock and no I/O. Time comes in as arguments; the latency windows, breakers and throttle are
shared objects the executor feeds, read here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from tailrace.engine.outcomes import AttemptOutcome, ErrorKind, FailureReason
from tailrace.engine.specs import HedgeConfig, ModelChoice
from tailrace.engine.tokens import CHARS_PER_TOKEN
from tailrace.policies.attempts import AttemptState, Decision, GiveUp, Start
from tailrace.policies.breaker import BreakerBoard, BreakerConfig
from tailrace.policies.latency import LatencyConfig, LatencyStats, model_key
from tailrace.policies.throttle import ExtraTokenBudget, RetryThrottle, ThrottleConfig

__all__ = ["HedgeConfig", "HedgeEvents", "HedgingPolicy", "NullEvents", "TailState", "TailTuning", "effective_config"]

ACCOUNT_WIDE = frozenset({ErrorKind.AUTH, ErrorKind.QUOTA_EXHAUSTED})
BUSY_KINDS = frozenset({ErrorKind.OVERLOADED, ErrorKind.RATE_LIMITED})
PER_TIER_ATTEMPTS = 2


class HedgeEvents(Protocol):
    """What the policy tells the executor's metrics (no I/O here: the executor decides what to do)."""

    def duplicate_sent(self, step_id: str, model: str, delay_s: float, trigger: str) -> None: ...

    def refused(self, step_id: str, role: str, by: str) -> None: ...

    def degraded(self, step_id: str, model: str, tier: int, reason: str) -> None: ...


class NullEvents:
    def duplicate_sent(self, step_id: str, model: str, delay_s: float, trigger: str) -> None:
        pass

    def refused(self, step_id: str, role: str, by: str) -> None:
        pass

    def degraded(self, step_id: str, model: str, tier: int, reason: str) -> None:
        pass


class TailTuning(BaseModel):
    """The executor-wide side of tail control: latency windows, circuit breakers, retry throttle, and
    how often the windows are shared with other executors. Durations in seconds of the executor's clock."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    throttle: ThrottleConfig = Field(default_factory=ThrottleConfig)
    sync_interval_s: float = Field(default=1.0, gt=0)

    def scaled(self, factor: float) -> TailTuning:
        """Every duration times `factor` (e.g. for a simulator running `factor` times real speed)."""
        return TailTuning(
            latency=self.latency.scaled(factor),
            breaker=self.breaker.scaled(factor),
            throttle=self.throttle,
            sync_interval_s=self.sync_interval_s * factor,
        )


def effective_config(default: HedgeConfig, step: HedgeConfig | None) -> HedgeConfig:
    """The executor's default with the fields a step set explicitly."""
    if step is None:
        return default
    return default.model_copy(update={k: getattr(step, k) for k in step.model_fields_set})


def scaled_hedge(config: HedgeConfig, factor: float) -> HedgeConfig:
    """The same config on a clock `factor` times faster or slower (e.g. a time-scaled simulator)."""
    return config.model_copy(
        update={"stall_gap_s": config.stall_gap_s * factor, "min_stream_s": config.min_stream_s * factor}
    )


@dataclass
class TailState:
    """The executor-wide state every step's policy reads: latency windows, breakers, retry throttle."""

    stats: LatencyStats
    breakers: BreakerBoard = field(default_factory=BreakerBoard)
    throttle: RetryThrottle = field(default_factory=RetryThrottle)
    events: HedgeEvents = field(default_factory=NullEvents)


@dataclass(frozen=True)
class _Pending:
    delay: float = 0.0
    trigger: str = ""
    reason: str = ""
    backs: tuple[int, float] | None = None  # the running attempt a duplicate backs up


@dataclass(frozen=True)
class _Pick:
    tier: int
    reason: str  # why this rung and not the one asked for: "" | deadline | breaker | unhealthy | throttle


class HedgingPolicy:
    def __init__(
        self,
        models: Sequence[ModelChoice],
        config: HedgeConfig,
        tail: TailState,
        *,
        step_id: str = "",
        side_effect: bool = False,
        max_attempts: int = 4,
        time_share: float | None = None,
        budget: ExtraTokenBudget | None = None,
        expected_tokens: Sequence[int] | None = None,
    ) -> None:
        self._models = list(models)
        self._keys = [model_key(m.provider, m.model) for m in self._models]
        self._config = config
        self._tail = tail
        self._step_id = step_id
        self._side_effect = side_effect
        self._max_attempts = max_attempts
        self._share = time_share
        self._budget = budget or ExtraTokenBudget(None)
        self._expected_tokens = list(expected_tokens) if expected_tokens else [0] * len(self._models)
        self._step_end: float | None = None
        self._refused_for: set[tuple[int, float]] = set()  # running attempts a duplicate was refused for
        self._pending: dict[tuple[int, str], _Pending] = {}  # (tier, role) -> what the Start was for
        self.refusals: Counter[str] = Counter()  # by budget: extra_tokens | throttle | gate

    # ---- the decision -------------------------------------------------------------------------------

    def decide(self, attempts: Sequence[AttemptState], now: float, deadline: float) -> Decision:
        if self._step_end is None:
            share = 1.0 if self._share is None else min(1.0, max(0.0, self._share))
            self._step_end = now + share * max(0.0, deadline - now)
        if now >= deadline:
            return GiveUp(FailureReason.DEADLINE_EXCEEDED, "no time left")
        if not attempts:
            pick = self._pick(0, now, set(), set(), for_retry=False)
            if pick is None:
                return GiveUp(FailureReason.PROVIDER_ERROR, "no usable model")
            return self._start(pick, now, "primary", 0.0, "")
        running = [a for a in attempts if a.running]
        if running:
            return self._maybe_duplicate(attempts, running, now, deadline)
        return self._after_failure(attempts, now, deadline)

    def _maybe_duplicate(
        self, attempts: Sequence[AttemptState], running: list[AttemptState], now: float, deadline: float
    ) -> Decision:
        c = self._config
        if self._side_effect or not c.enabled:
            return None
        duplicates = sum(1 for a in attempts if a.role == "duplicate")
        if duplicates >= c.max_duplicates or len(running) >= c.max_concurrent:
            return None
        newest = max(running, key=lambda a: a.started_at)
        key = (newest.tier, newest.started_at)
        if key in self._refused_for:
            return None  # a budget said no for this attempt: wait on it
        at, trigger = self._trigger(newest)
        if at >= deadline:
            return None
        if at > now:
            return Start(newest.tier, at, "duplicate")  # a wake-up; where it goes is decided then
        pick = self._duplicate_target(newest.tier, now)
        if pick is None:
            return self._refuse(key, "duplicate", "throttle")
        if not self._budget.affords(attempts, self._expected_tokens, self._expected_tokens[pick.tier], "duplicate"):
            return self._refuse(key, "duplicate", "extra_tokens")
        return self._start(pick, now, "duplicate", now - newest.started_at, trigger, backs=key)

    def _trigger(self, a: AttemptState) -> tuple[float, str]:
        """When the attempt counts as late, and by which signal."""
        c, stats = self._config, self._tail.stats
        choice = self._models[a.tier]
        ttft, latency = stats.ttft_s(choice, c.ttft_quantile), stats.latency_s(choice, c.latency_quantile)
        if self._unhealthy(a.tier) and any(not self._unhealthy(i) for i in range(a.tier + 1, len(self._models))):
            # A slowed-down model's window fills with slow samples and its quantiles follow them up; it
            # is backed up against its spec's promise instead, so hedging does not fade in a brownout.
            # Only while a healthy alternative exists: when everything is slow (an overloaded engine
            # sees every model late), earlier duplicates would only add to the load.
            factor = stats.config.cold_trigger_factor
            ttft = min(ttft, choice.expected_ttft_s * factor)
            latency = min(latency, choice.expected_latency_s * factor)
        candidates = [(a.started_at + latency, "latency")]
        if a.first_token_at is None:
            candidates.append((a.started_at + ttft, "ttft"))
        else:
            last = a.last_token_at if a.last_token_at is not None else a.first_token_at
            candidates.append((last + c.stall_gap_s, "stall"))
            rate = stats.decode_rate(choice)
            if rate is not None and c.slow_stream_factor > 0:
                # The time by which the tokens received so far are too few for a healthy stream: when
                # the runner wakes then and more have come, this moves on; when not, it is late.
                received = a.received_chars / CHARS_PER_TOKEN
                slow_at = a.first_token_at + max(c.min_stream_s, received / (c.slow_stream_factor * rate))
                candidates.append((slow_at, "slow_stream"))
        return min(candidates)

    def _after_failure(self, attempts: Sequence[AttemptState], now: float, deadline: float) -> Decision:
        """Nothing is running and nothing valid came back: the next attempt, at once, or give up."""
        last = max(attempts, key=lambda a: (a.finished_at or a.started_at, a.started_at))
        tries = sum(1 for a in attempts if a.role != "duplicate")
        if tries >= self._max_attempts:
            return self._exhausted(last, f"gave up after {tries} attempts")
        banned_models, banned_providers = self._banned(attempts)
        tier = last.tier
        per_tier = sum(1 for a in attempts if a.tier == tier)
        if last.outcome == AttemptOutcome.INVALID:
            # The same prompt to the same model tends to fail the same way: go down first.
            starts = [tier + 1, tier] if tier + 1 < len(self._models) else [tier]
        elif last.error is not None and last.error.kind in BUSY_KINDS and tier + 1 < len(self._models):
            # The provider said it is overloaded or rate-limited: the same model again is likely to say
            # so again. The next rung first, the same one (after its retry-after) if that is all left.
            starts = [tier + 1, tier] if per_tier < PER_TIER_ATTEMPTS else [tier + 1]
        elif last.error is not None and last.error.retryable and per_tier < PER_TIER_ATTEMPTS:
            starts = [tier, tier + 1]
        else:
            starts = [tier + 1]
        throttled = False
        for start in starts:
            if start >= len(self._models):
                continue
            pick = self._pick(start, now, banned_models, banned_providers, for_retry=True)
            if pick is None:
                throttled = True
                continue
            at = now
            if pick.tier == tier and last.error is not None and last.error.retry_after_s is not None:
                # Measured from when the failure happened, so asking again later does not push it back.
                at = max(now, (last.finished_at or now) + last.error.retry_after_s)
                if at >= min(deadline, self._step_end or deadline):
                    continue
            if not self._budget.affords(attempts, self._expected_tokens, self._expected_tokens[pick.tier], "retry"):
                self._note_refusal("retry", "extra_tokens")
                return GiveUp(FailureReason.BUDGET_EXHAUSTED, "the run's extra-token allowance is spent")
            return self._start(pick, at, "retry", 0.0, "")
        if throttled:
            self._note_refusal("retry", "throttle")
            return GiveUp(FailureReason.PROVIDER_ERROR, "retries throttled: the models keep failing")
        return self._exhausted(last, "no model left to try")

    # ---- choosing a rung ----------------------------------------------------------------------------

    def _fits(self, tier: int, now: float) -> bool:
        latency = self._tail.stats.latency_s(self._models[tier], self._config.fit_quantile, trigger=False)
        return now + latency <= (self._step_end if self._step_end is not None else float("inf"))

    def _expected(self, tier: int) -> float:
        return self._tail.stats.latency_s(self._models[tier], self._config.fit_quantile, trigger=False)

    def _pick(
        self, start: int, now: float, banned_models: set[str], banned_providers: set[str], *, for_retry: bool
    ) -> _Pick | None:
        """The rung for a primary or a retry: from `start` down, the first one that is usable (not
        banned, circuit not open; for a retry: not throttled, not failing or slowed down) and fits
        the step's time share."""
        tail = self._tail
        allowed = [
            i
            for i in range(start, len(self._models))
            if self._models[i].model not in banned_models and self._models[i].provider not in banned_providers
        ]
        if for_retry:
            allowed = [i for i in allowed if tail.throttle.allows(self._keys[i])]
        if not allowed:
            return None
        closed = [i for i in allowed if tail.breakers.allows(self._keys[i], now)]
        pool = closed or allowed  # every circuit open: trying beats giving up
        # A primary still goes to a slow or flaky model whose circuit is closed (its duplicates will
        # not): that keeps its statistics current, so the engine sees the brownout end.
        healthy = [i for i in pool if not (for_retry and self._unhealthy(i))]
        pool = healthy or pool
        fitting = [i for i in pool if self._fits(i, now)]
        tier = fitting[0] if fitting else min(pool, key=self._expected)
        return _Pick(tier, self._why(start, tier, allowed, closed, healthy, fitting))

    def _duplicate_target(self, tier: int, now: float) -> _Pick | None:
        """The same model while it is healthy and fits, else the first rung below that is; None when
        every candidate's retries are throttled."""
        tail = self._tail
        allowed = [i for i in range(tier, len(self._models)) if tail.throttle.allows(self._keys[i])]
        if not allowed:
            return None
        closed = [i for i in allowed if tail.breakers.allows(self._keys[i], now)]
        healthy = [i for i in closed if not self._unhealthy(i)]
        fitting = [i for i in healthy if self._fits(i, now)]
        if fitting:
            pick = fitting[0]
        elif healthy:
            pick = min(healthy, key=self._expected)
        elif closed:
            pick = closed[0]
        else:
            pick = allowed[0]
        return _Pick(pick, self._why(tier, pick, allowed, closed, healthy, fitting))

    def _unhealthy(self, tier: int) -> bool:
        return self._tail.stats.health(self._keys[tier], self._models[tier].expected_latency_s).unhealthy

    def _why(
        self, wanted: int, got: int, allowed: list[int], closed: list[int], healthy: list[int], fitting: list[int]
    ) -> str:
        if got == wanted:
            return ""
        if wanted not in allowed:
            return "throttle"
        if wanted not in closed:
            return "breaker"
        if wanted not in healthy:
            return "unhealthy"
        return "deadline"

    # ---- bookkeeping --------------------------------------------------------------------------------

    def _start(
        self, pick: _Pick, at: float, role: str, delay: float, trigger: str, backs: tuple[int, float] | None = None
    ) -> Start:
        self._pending[(pick.tier, role)] = _Pending(delay, trigger, pick.reason, backs)
        return Start(pick.tier, at, role)

    def _refuse(self, key: tuple[int, float], role: str, by: str) -> None:
        self._refused_for.add(key)
        self._note_refusal(role, by)
        return None

    def _note_refusal(self, role: str, by: str) -> None:
        self.refusals[by] += 1
        self._tail.events.refused(self._step_id, role, by)

    def started(self, decision: Start, now: float) -> None:
        pending = self._pending.pop((decision.tier, decision.role), _Pending())
        model = self._models[decision.tier].model
        if decision.role == "duplicate":
            self._tail.events.duplicate_sent(self._step_id, model, pending.delay, pending.trigger)
        if decision.tier > 0:
            self._tail.events.degraded(self._step_id, model, decision.tier, pending.reason or "ladder")

    def refused(self, decision: Start, reason: str, now: float) -> None:
        """The spend gate (run cost cap, global budget) said no to a `Start` this policy returned."""
        pending = self._pending.pop((decision.tier, decision.role), _Pending())
        if pending.backs is not None:
            self._refused_for.add(pending.backs)  # wait on the attempt it was meant to back up
        self._note_refusal(decision.role, "gate")

    def _banned(self, attempts: Sequence[AttemptState]) -> tuple[set[str], set[str]]:
        models: set[str] = set()
        providers: set[str] = set()
        for a in attempts:
            if a.error is not None and not a.error.retryable:
                choice = self._models[a.tier]
                models.add(choice.model)
                if a.error.kind in ACCOUNT_WIDE:
                    providers.add(choice.provider)
        return models, providers

    @staticmethod
    def _exhausted(last: AttemptState, detail: str) -> GiveUp:
        if last.outcome == AttemptOutcome.INVALID:
            return GiveUp(FailureReason.INVALID_OUTPUT, detail)
        return GiveUp(FailureReason.PROVIDER_ERROR, detail)
