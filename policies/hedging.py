"""The one attempt policy: when a step's next attempt starts, on which rung of its ladder, in what
role, and when a running attempt is given up on. Hedging off is a configuration of it.

In the spirit of Finagle's BackupRequestFilter, gRPC hedging and trio's happy eyeballs:

* Speculation. A duplicate starts when every running attempt is late: no first token by its model's
  TTFT quantile `1 - max_extra_load`, no answer by its latency quantile `1 - max_extra_load / 2`, a
  stream silent for `stall_gap_s`, or one far below its model's decode rate. At most
  `max_duplicates` speculative attempts run at once (finished ones do not count).
* Recovery is not speculation. A failed, invalid or timed-out attempt, when nothing running is on
  track, starts the next attempt at once (after the provider's retry-after or a backoff when it
  goes to the same rung) and never counts against the duplicate cap.
* Timeouts. An attempt with no first token by `timeout_factor` x its TTFT trigger, no answer by
  `timeout_factor` x its latency trigger, or a stream silent for `timeout_factor` x `stall_gap_s` is
  cancelled (`stalled`) and counts as a failure: hedging off, that is how a hung call ends. When
  every slot is taken by late attempts with no first token, the oldest is cancelled to make room.
* Where an attempt goes. A duplicate: the same model while it is healthy, unless a duplicate on it
  is already late the same way, or the stream stalled (evidence against the model): then the next
  rung. A retry: the same rung for a transient error (500, reset, a 429 whose retry-after fits the
  step's share of the time); the next rung first after an invalid answer, an overload, a timeout or
  a malformed response. A non-retryable error closes that model for the step (auth and quota the
  whole provider) and cancels its siblings there at once; a content-policy rejection ends the step
  unless the step allows another model (`on_content_policy="next_model"`).
* Deadline-aware ladder: a rung is preferred only if its latency quantile fits in the step's share
  of the time left (see `tailrace.policies.allocation`); a duplicate starts only on a rung that can
  finish before the deadline, else it waits.
* Budgets: a duplicate needs the run's extra-token allowance and the target model's retry throttle
  (a throttled retry waits `max_backoff_s`); a refusal is remembered, so the policy does not ask again.
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

from tailrace.engine.outcomes import AttemptOutcome, CancelReason, ErrorKind, FailureReason
from tailrace.engine.specs import HedgeConfig, ModelChoice
from tailrace.engine.tokens import CHARS_PER_TOKEN
from tailrace.policies.attempts import AttemptState, Cancel, Decision, GiveUp, Start
from tailrace.policies.breaker import BreakerBoard, BreakerConfig
from tailrace.policies.latency import LatencyConfig, LatencyStats, model_key
from tailrace.policies.throttle import ExtraTokenBudget, RetryThrottle, ThrottleConfig

__all__ = ["HedgeConfig", "HedgeEvents", "HedgingPolicy", "NullEvents", "TailState", "TailTuning", "effective_config"]

ACCOUNT_WIDE = frozenset({ErrorKind.AUTH, ErrorKind.QUOTA_EXHAUSTED})
# After these the same model is likely to fail the same way: the next rung first.
MOVE_ON_KINDS = frozenset({ErrorKind.OVERLOADED, ErrorKind.TIMEOUT, ErrorKind.MALFORMED_RESPONSE})
# A bound on one step's attempts whatever happens (transient errors are retried while time allows).
MAX_STEP_ATTEMPTS = 32


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
    durations = ("stall_gap_s", "min_stream_s", "retry_backoff_s", "max_backoff_s")
    return config.model_copy(update={k: getattr(config, k) * factor for k in durations})


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
        on_content_policy: str = "fail",
    ) -> None:
        self._models = list(models)
        self._keys = [model_key(m.provider, m.model) for m in self._models]
        self._config = config
        self._tail = tail
        self._step_id = step_id
        self._speculate = config.enabled and not side_effect and config.max_duplicates > 0
        self._max_attempts = max_attempts
        self._share = time_share
        self._budget = budget or ExtraTokenBudget(None)
        self._expected_tokens = list(expected_tokens) if expected_tokens else [0] * len(self._models)
        self._content_policy_fallback = on_content_policy == "next_model"
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
            pick = self._pick([0, *range(1, len(self._models))], now, deadline, set(), role="primary")
            if pick is None:
                return GiveUp(FailureReason.PROVIDER_ERROR, "no usable model")
            return self._start(pick, now, "primary", 0.0, "")
        rejected = self._content_policy_rejection(attempts)
        if rejected is not None:
            return rejected
        running = [i for i, a in enumerate(attempts) if a.running]
        banned_models, banned_providers = self._banned(attempts)
        for i in running:
            choice = self._models[attempts[i].tier]
            if choice.model in banned_models or choice.provider in banned_providers:
                # The same request there will be refused the same way: stop waiting for it.
                return Cancel(i, CancelReason.MODEL_REJECTED, now)
        timeouts = {i: self._timeout_at(attempts[i]) for i in running}
        for i in running:
            if timeouts[i] <= now:
                return Cancel(i, CancelReason.STALLED, now)
        if not running:
            return self._recover(attempts, now, deadline, running)
        triggers = {i: self._trigger(attempts[i]) for i in running}
        on_track = [i for i in running if triggers[i][0] > now]
        if not on_track:
            decision = self._when_all_late(attempts, running, triggers, now, deadline)
            if decision is not None:
                return decision
        return self._wake_up(attempts, running, on_track, triggers, timeouts, deadline)

    def _when_all_late(
        self,
        attempts: Sequence[AttemptState],
        running: list[int],
        triggers: dict[int, tuple[float, str]],
        now: float,
        deadline: float,
    ) -> Decision:
        """Every running attempt is late: recover from a failure, or back them up."""
        newest = max(running, key=lambda i: attempts[i].started_at)
        owed = any(
            self._failed(a) and (a.finished_at or 0.0) > attempts[newest].started_at for a in attempts if not a.running
        )
        room = len(running) < self._config.max_concurrent
        if owed:
            if not room:
                return self._make_room(attempts, running, now)
            return self._recover(attempts, now, deadline, running)
        if not self._speculate:
            return None
        speculative = sum(1 for i in running if attempts[i].role == "duplicate")
        if not room or speculative >= self._config.max_duplicates:
            return self._make_room(attempts, running, now)
        key = (attempts[newest].tier, attempts[newest].started_at)
        if key in self._refused_for:
            return None  # a budget said no for this attempt: wait on it
        trigger = triggers[newest][1]
        avoid = self._late_the_same_way(attempts, running, triggers, now)
        if trigger == "stall":
            avoid.add(attempts[newest].tier)  # a stream that stopped: evidence against the model
        pick = self._duplicate_target(attempts[newest].tier, now, deadline, avoid)
        if pick is None:
            return self._refuse(key, "duplicate", "throttle") if self._all_throttled() else None
        if not self._budget.affords(attempts, self._expected_tokens, self._expected_tokens[pick.tier], "duplicate"):
            return self._refuse(key, "duplicate", "extra_tokens")
        return self._start(pick, now, "duplicate", now - attempts[newest].started_at, trigger, backs=key)

    def _make_room(self, attempts: Sequence[AttemptState], running: list[int], now: float) -> Decision:
        """Every slot is taken by late attempts: when none of them has a first token, the oldest goes."""
        if any(attempts[i].first_token_at is not None for i in running):
            return None
        oldest = min(running, key=lambda i: attempts[i].started_at)
        return Cancel(oldest, CancelReason.STALLED, now)

    def _wake_up(
        self,
        attempts: Sequence[AttemptState],
        running: list[int],
        on_track: list[int],
        triggers: dict[int, tuple[float, str]],
        timeouts: dict[int, float],
        deadline: float,
    ) -> Decision:
        """Nothing to do now: the earliest time something could change (a trigger or a timeout)."""
        due: list[tuple[float, int, Decision]] = []
        if on_track and self._speculate:
            i = min(on_track, key=lambda j: triggers[j][0])
            if triggers[i][0] < deadline:
                due.append((triggers[i][0], 1, Start(attempts[i].tier, triggers[i][0], "duplicate")))
        i = min(running, key=lambda j: timeouts[j])
        if timeouts[i] < deadline:
            due.append((timeouts[i], 0, Cancel(i, CancelReason.STALLED, timeouts[i])))
        return min(due, key=lambda d: d[:2])[2] if due else None

    # ---- lateness -----------------------------------------------------------------------------------

    def _window_delays(self, tier: int) -> tuple[float, float]:
        """(TTFT, latency) quantiles of the rung's own window at the trigger quantiles."""
        c, stats = self._config, self._tail.stats
        choice = self._models[tier]
        return stats.ttft_s(choice, c.ttft_trigger_quantile), stats.latency_s(choice, c.latency_trigger_quantile)

    def _trigger_delays(self, tier: int) -> tuple[float, float]:
        """(TTFT, latency) after which an attempt on this rung is late."""
        stats = self._tail.stats
        choice = self._models[tier]
        ttft, latency = self._window_delays(tier)
        if self._unhealthy(tier) and any(not self._unhealthy(i) for i in range(len(self._models)) if i != tier):
            # A slowed-down model's window fills with slow samples and its quantiles follow them up; it
            # is backed up against its spec's promise instead, so hedging does not fade in a brownout.
            # Only while a healthy alternative exists: when everything is slow (an overloaded engine
            # sees every model late), earlier duplicates would only add to the load.
            factor = stats.config.cold_trigger_factor
            ttft = min(ttft, choice.expected_ttft_s * factor)
            latency = min(latency, choice.expected_latency_s * factor)
        return ttft, latency

    def _trigger(self, a: AttemptState) -> tuple[float, str]:
        """When the attempt counts as late, and by which signal."""
        c, stats = self._config, self._tail.stats
        ttft, latency = self._trigger_delays(a.tier)
        candidates = [(a.started_at + latency, "latency")]
        if a.first_token_at is None:
            candidates.append((a.started_at + ttft, "ttft"))
        else:
            last = a.last_token_at if a.last_token_at is not None else a.first_token_at
            candidates.append((last + c.stall_gap_s, "stall"))
            rate = stats.decode_rate(self._models[a.tier])
            if rate is not None and c.slow_stream_factor > 0:
                # The time by which the tokens received so far are too few for a healthy stream: when
                # the runner wakes then and more have come, this moves on; when not, it is late.
                received = a.received_chars / CHARS_PER_TOKEN
                slow_at = a.first_token_at + max(c.min_stream_s, received / (c.slow_stream_factor * rate))
                candidates.append((slow_at, "slow_stream"))
        return min(candidates)

    def _timeout_at(self, a: AttemptState) -> float:
        """When a running attempt is given up on (cancelled `stalled`, then retried). From the model's own
        window, not the brownout shortcut of the triggers: a duplicate may leave a slowed model early,
        but an attempt is killed only when it is late for what the model does now. (When a busy engine
        sees every answer late, killing on the priors would only add load.)"""
        c = self._config
        ttft, latency = self._window_delays(a.tier)
        ends = [a.started_at + c.timeout_factor * latency]
        if a.first_token_at is None:
            ends.append(a.started_at + c.timeout_factor * ttft)
        else:
            last = a.last_token_at if a.last_token_at is not None else a.first_token_at
            ends.append(last + c.timeout_factor * c.stall_gap_s)
        return min(ends)

    def _late_the_same_way(
        self, attempts: Sequence[AttemptState], running: list[int], triggers: dict[int, tuple[float, str]], now: float
    ) -> set[int]:
        """Rungs where two running attempts are late by the same signal: the model, not bad luck."""
        seen: Counter[tuple[int, str]] = Counter(
            (attempts[i].tier, triggers[i][1]) for i in running if triggers[i][0] <= now
        )
        return {tier for (tier, _), n in seen.items() if n >= 2}

    # ---- recovery -----------------------------------------------------------------------------------

    @staticmethod
    def _failed(a: AttemptState) -> bool:
        if a.outcome in (AttemptOutcome.ERROR, AttemptOutcome.INVALID):
            return True
        return a.outcome == AttemptOutcome.CANCELLED and a.cancel_reason == CancelReason.STALLED

    def _recover(self, attempts: Sequence[AttemptState], now: float, deadline: float, running: list[int]) -> Decision:
        """The next attempt after a failure: at once, after a retry-after or backoff, or give up."""
        ended = [a for a in attempts if self._failed(a)]
        if not ended:
            return None  # cancelled for another reason (a sibling's rejection): wait for what runs
        last = max(ended, key=lambda a: (a.finished_at or a.started_at, a.started_at))
        answered_badly = sum(
            1
            for a in attempts
            if a.outcome == AttemptOutcome.INVALID or (a.error is not None and not a.error.retryable) or _unreachable(a)
        )
        if answered_badly >= self._max_attempts:
            return self._exhausted(attempts, f"gave up after {answered_badly} failed answers")
        if len(attempts) >= MAX_STEP_ATTEMPTS:
            return self._exhausted(attempts, f"gave up after {len(attempts)} attempts")
        banned_models, banned_providers = self._banned(attempts)
        tier, n = last.tier, len(self._models)
        below, above = list(range(tier + 1, n)), list(range(tier))
        kind = last.error.kind if last.error is not None else None
        stalled = last.outcome == AttemptOutcome.CANCELLED
        if last.outcome == AttemptOutcome.INVALID or stalled or kind in MOVE_ON_KINDS:
            order = [*below, tier, *above]
        elif (last.error is not None and not last.error.retryable) or _unreachable(last):
            order = [*below, *above]
        else:
            order = [tier, *below, *above]
        finished = last.finished_at if last.finished_at is not None else now
        retry_after = last.error.retry_after_s if last.error is not None else None
        # A 429: the quota is ours to respect. Wait for the same model when its retry-after fits the
        # step's share of the time; a second provider is a second incident surface.
        if (
            kind == ErrorKind.RATE_LIMITED
            and retry_after is not None
            and finished + retry_after + self._expected(tier) > (self._step_end or deadline)
        ):
            order = [*below, *above, tier]
        avoid = {attempts[i].tier for i in running}
        usable = [
            i
            for i in order
            if self._models[i].model not in banned_models and self._models[i].provider not in banned_providers
        ]
        pick = self._pick(usable, now, deadline, avoid, role="retry")
        if pick is None:
            return self._exhausted(attempts, "no model left to try") if not running else None
        at = max(now, finished + self._retry_delay(attempts, last, pick.tier))
        if running and at > now:
            return None  # something still runs: recover on another rung rather than wait here
        if at >= deadline:
            return self._exhausted(attempts, "no time left for a retry") if not running else None
        if self._warm(pick.tier) and at + self._median(pick.tier) > deadline and not running:
            return GiveUp(FailureReason.DEADLINE_EXCEEDED, "no rung can answer before the deadline")
        if not self._budget.affords(attempts, self._expected_tokens, self._expected_tokens[pick.tier], "retry"):
            self._note_refusal("retry", "extra_tokens")
            if running:
                return None
            return GiveUp(FailureReason.BUDGET_EXHAUSTED, "the run's extra-token allowance is spent")
        return self._start(pick, at, "retry", 0.0, "")

    def _retry_delay(self, attempts: Sequence[AttemptState], last: AttemptState, tier: int) -> float:
        """Backoff before a retry on `tier`: the provider's retry-after, else none for the first
        transient failure there, then `retry_backoff_s` doubling; a throttled model waits the most."""
        c = self._config
        delay = 0.0
        if tier == last.tier and last.error is not None and last.error.retry_after_s is not None:
            delay = last.error.retry_after_s
        elif tier == last.tier and last.outcome != AttemptOutcome.INVALID:
            n = sum(
                1
                for a in attempts
                if a.tier == tier
                and self._failed(a)
                and a.outcome != AttemptOutcome.INVALID
                and (a.error is None or a.error.retry_after_s is None)
            )
            delay = 0.0 if n <= 1 else min(c.max_backoff_s, c.retry_backoff_s * 2 ** (n - 2))
        if not self._tail.throttle.allows(self._keys[tier]):
            self._note_refusal("retry", "throttle")
            delay = max(delay, c.max_backoff_s)
        return delay

    def _content_policy_rejection(self, attempts: Sequence[AttemptState]) -> GiveUp | None:
        if self._content_policy_fallback:
            return None
        for a in attempts:
            if a.error is not None and a.error.kind == ErrorKind.CONTENT_POLICY:
                model = self._models[a.tier].model
                return GiveUp(FailureReason.CONTENT_POLICY, f"{model} refused the request on content policy")
        return None

    # ---- choosing a rung ----------------------------------------------------------------------------

    def _expected(self, tier: int) -> float:
        return self._tail.stats.latency_s(self._models[tier], self._config.fit_quantile, trigger=False)

    def _median(self, tier: int) -> float:
        return self._tail.stats.latency_s(self._models[tier], 0.5, trigger=False)

    def _warm(self, tier: int) -> bool:
        return self._tail.stats.quantile(self._keys[tier], "latency", 0.5) is not None

    def _fits(self, tier: int, now: float) -> bool:
        return now + self._expected(tier) <= (self._step_end if self._step_end is not None else float("inf"))

    def _pick(self, order: list[int], now: float, deadline: float, avoid: set[int], *, role: str) -> _Pick | None:
        """The rung for a primary or a retry, from `order`: the first one that is usable (circuit not
        open; for a retry: not slowed down or failing, nothing of this step late there) and fits the
        step's time share; else the fastest usable one."""
        if not order:
            return None
        tail = self._tail
        closed = [i for i in order if tail.breakers.allows(self._keys[i], now)]
        pool = closed or order  # every circuit open: trying beats giving up
        # A primary still goes to a slow or flaky model whose circuit is closed (its retries will not):
        # that keeps its statistics current, so the engine sees the brownout end.
        healthy = [i for i in pool if not (role != "primary" and self._unhealthy(i))]
        pool = healthy or pool
        pool = [i for i in pool if i not in avoid] or pool
        fitting = [i for i in pool if self._fits(i, now)]
        tier = fitting[0] if fitting else min(pool, key=self._expected)
        allowed = [i for i in order if tail.throttle.allows(self._keys[i])]
        return _Pick(tier, self._why(order[0], tier, allowed or order, closed, healthy, fitting))

    def _duplicate_target(self, tier: int, now: float, deadline: float, avoid: set[int]) -> _Pick | None:
        """The same model while it is healthy and fits, else the first rung below that is; None when no
        candidate can finish before the deadline or every candidate's retries are throttled."""
        tail = self._tail
        candidates = [i for i in range(tier, len(self._models)) if i not in avoid]
        allowed = [i for i in candidates if tail.throttle.allows(self._keys[i])]
        closed = [i for i in allowed if tail.breakers.allows(self._keys[i], now)]
        healthy = [i for i in closed if not self._unhealthy(i)]
        pool = healthy or closed or allowed
        in_time = [i for i in pool if now + self._expected(i) <= deadline]
        if not in_time:
            return None
        fitting = [i for i in in_time if self._fits(i, now)]
        pick = fitting[0] if fitting else min(in_time, key=self._expected)
        return _Pick(pick, self._why(tier, pick, allowed, closed, healthy, fitting))

    def _all_throttled(self) -> bool:
        return not any(self._tail.throttle.allows(k) for k in self._keys)

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
        if wanted not in fitting:
            return "deadline"
        return "ladder"

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
            if _unreachable(a):  # the provider's endpoint refused the connection: every model behind it too
                providers.add(self._models[a.tier].provider)
            elif a.error is not None and not a.error.retryable:
                choice = self._models[a.tier]
                models.add(choice.model)
                if a.error.kind in ACCOUNT_WIDE:
                    providers.add(choice.provider)
        return models, providers

    @staticmethod
    def _exhausted(attempts: Sequence[AttemptState], detail: str) -> GiveUp:
        """The step's failure reason follows from what its attempts said, whatever budget ended it: an
        invalid answer as the last word is `invalid_output`, anything else `provider_error`."""
        said = [a for a in attempts if a.outcome in (AttemptOutcome.INVALID, AttemptOutcome.ERROR)]
        last = max(said, key=lambda a: (a.finished_at or a.started_at, a.started_at)) if said else None
        if last is not None and last.outcome == AttemptOutcome.INVALID:
            return GiveUp(FailureReason.INVALID_OUTPUT, detail)
        return GiveUp(FailureReason.PROVIDER_ERROR, detail)


def _unreachable(attempt: AttemptState) -> bool:
    """The request never reached a server (connection refused, unknown host): the same endpoint will refuse
    the next one too, so no retry there; a setup fault the driver reports (`tailrace.engine.config_errors`)."""
    error = attempt.error
    return error is not None and error.kind == ErrorKind.CONNECTION and error.endpoint is not None
