"""The eleven defects of issue 8 (and two of issue 13) as scenarios played on fake time.

Each scenario scripts what every attempt does, in the order they start (time to first token, time
to its end, how it ends), plays the hedging policy against it (`play`: ask, start, cancel, wake up,
exactly as the step runner does) and asserts every start and cancel at its exact virtual time.

Windows are warmed with identical samples, so every quantile of a model is its sample value:
strong TTFT 1.0 s / latency 4.0 s, mid 0.8 / 2.0, fast 0.5 / 1.0. With `timeout_factor=2` an
attempt on strong is killed without a first token at +2.0 s, mid at +1.6 s, fast at +1.0 s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from tailrace.engine.clock import FakeClock
from tailrace.engine.outcomes import AttemptOutcome, CancelReason, ErrorKind, FailureReason, ProviderError
from tailrace.engine.specs import HedgeConfig, ModelChoice
from tailrace.policies.attempts import AttemptState, Cancel, GiveUp, Start
from tailrace.policies.breaker import BreakerBoard, BreakerConfig
from tailrace.policies.hedging import HedgingPolicy, TailState
from tailrace.policies.latency import LatencyConfig, LatencyStats, model_key
from tailrace.policies.throttle import RetryThrottle

LADDER = [
    ModelChoice(provider="openai", model="strong", max_tokens=400, expected_ttft_s=2.0, expected_latency_s=6.0),
    ModelChoice(provider="anthropic", model="mid", max_tokens=400, expected_ttft_s=1.0, expected_latency_s=3.0),
    ModelChoice(provider="openai", model="fast", max_tokens=400, expected_ttft_s=0.6, expected_latency_s=1.5),
]
KEYS = [model_key(m.provider, m.model) for m in LADDER]
WARM = {KEYS[0]: (1.0, 4.0), KEYS[1]: (0.8, 2.0), KEYS[2]: (0.5, 1.0)}
CONFIG = HedgeConfig(max_extra_load=0.1, stall_gap_s=2.0, max_concurrent=3, max_duplicates=2, timeout_factor=2.0)
T0 = 100.0
VALID, INVALID, ERROR = AttemptOutcome.VALID, AttemptOutcome.INVALID, AttemptOutcome.ERROR


def tail(warm: dict[str, tuple[float, float]] | None = WARM) -> TailState:
    stats = LatencyStats(LatencyConfig(min_samples=5, window_s=600, recent_s=60), FakeClock())
    for key, (ttft, latency) in (warm or {}).items():
        for _ in range(5):
            stats.observe(key, "ok", ttft, latency)
    return TailState(stats, BreakerBoard(BreakerConfig(consecutive_failures=3, cooldown_s=5.0)), RetryThrottle())


def err(kind: ErrorKind, retry_after: float | None = None) -> ProviderError:
    from tailrace.engine.outcomes import RETRYABLE_KINDS

    return ProviderError(kind=kind, retryable=kind in RETRYABLE_KINDS, retry_after_s=retry_after)


@dataclass(frozen=True)
class Does:
    """What one attempt does, relative to its start: first token at `ttft`, ends at `end` (None: never)."""

    end: float | None = None
    outcome: AttemptOutcome = VALID
    ttft: float | None = None
    error: ProviderError | None = None
    stall_after: float | None = None  # the stream goes silent this long after the first token


HANG = Does()  # accepts the request, never answers


def answers(after: float, ttft: float | None = None) -> Does:
    return Does(after, VALID, ttft if ttft is not None else min(after, 0.3))


def straggles(after: float) -> Does:
    """A valid answer whose first token comes a second before its end."""
    return Does(after, VALID, after - 1.0)


def fails(after: float, error: ProviderError) -> Does:
    return Does(after, ERROR, None, error)


def invalid(after: float) -> Does:
    return Does(after, INVALID, min(after, 0.2))


@dataclass
class _Live:
    tier: int
    role: str
    start: float
    does: Does
    cancelled: CancelReason | None = None
    cancelled_at: float | None = None

    def state(self, now: float) -> AttemptState:
        d = self.does
        first = None if d.ttft is None or self.start + d.ttft > now else self.start + d.ttft
        last = first
        if first is not None:
            silent_from = first + d.stall_after if d.stall_after is not None else None
            last = min(now, silent_from) if silent_from is not None else now
        ended = self.cancelled_at if self.cancelled is not None else self.end_at(now)
        base = AttemptState(
            tier=self.tier, started_at=self.start, role=self.role, first_token_at=first, last_token_at=last
        )
        if self.cancelled is not None:
            return replace(base, finished_at=ended, outcome=AttemptOutcome.CANCELLED, cancel_reason=self.cancelled)
        if ended is not None:
            return replace(base, finished_at=ended, outcome=d.outcome, error=d.error, tokens=100)
        return base

    def end_at(self, now: float) -> float | None:
        if self.does.end is None or self.start + self.does.end > now:
            return None
        return self.start + self.does.end

    def next_event(self, now: float) -> float | None:
        if self.cancelled is not None:
            return None
        times = [self.start + t for t in (self.does.ttft, self.does.end) if t is not None]
        later = [t for t in times if t > now]
        return min(later) if later else None


def play(p: HedgingPolicy, script: list[Does], deadline: float, now: float = T0) -> list[tuple]:
    """Run the policy against the scripted attempts; the events: (time, "start", tier, role),
    (time, "cancel", attempt, reason), (time, "won", attempt) or (time, "gave_up", reason)."""
    live: list[_Live] = []
    events: list[tuple] = []
    for _ in range(200):
        states = [a.state(now) for a in live]
        won = next((i for i, s in enumerate(states) if s.outcome == VALID), None)
        if won is not None:
            events.append((round(now, 6), "won", won))
            return events
        decision = p.decide(states, now, deadline)
        if isinstance(decision, GiveUp):
            events.append((round(now, 6), "gave_up", decision.reason.value))
            return events
        if isinstance(decision, Start) and decision.at <= now:
            does = script[len(live)] if len(live) < len(script) else HANG
            live.append(_Live(decision.tier, decision.role, now, does))
            p.started(decision, now)
            events.append((round(now, 6), "start", decision.tier, decision.role))
            continue
        if isinstance(decision, Cancel) and decision.at <= now:
            live[decision.attempt].cancelled, live[decision.attempt].cancelled_at = decision.reason, now
            events.append((round(now, 6), "cancel", decision.attempt, decision.reason.value))
            continue
        wake = [t for t in (a.next_event(now) for a in live) if t is not None]
        if decision is not None:
            wake.append(decision.at)
        nxt = min([deadline, *wake])
        if nxt <= now:
            raise AssertionError(f"no progress at {now}: {decision}")
        now = nxt
        if now >= deadline:
            events.append((round(now, 6), "deadline"))
            return events
    raise AssertionError("too many turns")


def policy(config: HedgeConfig = CONFIG, state: TailState | None = None, **kwargs) -> HedgingPolicy:
    kwargs.setdefault("expected_tokens", [500, 500, 500])
    return HedgingPolicy(LADDER, config, state or tail(), step_id="s", **kwargs)


def t(x: float) -> float:
    return round(T0 + x, 6)


# ---- 1. the trigger: the 1 - max_extra_load quantile, censored samples not taken as answers -------------


def test_1_trigger_is_the_quantile_the_extra_load_buys():
    # 80 % of strong's first tokens at 0.5 s, 20 % at 3.0 s: accepting 25 % extra load backs up at the
    # 75th percentile (0.5 s); accepting 5 % waits for the 95th (3.0 s).
    state = tail(warm={KEYS[1]: (0.8, 2.0), KEYS[2]: (0.5, 1.0)})
    for ttft in [0.5] * 16 + [3.0] * 4:
        state.stats.observe(KEYS[0], "ok", ttft, ttft + 2.0)
    cheap = CONFIG.model_copy(update={"max_extra_load": 0.25})
    assert policy(cheap, state).decide([AttemptState(0, T0)], T0, T0 + 30) == Start(0, t(0.5), "duplicate")
    dear = CONFIG.model_copy(update={"max_extra_load": 0.05})
    assert policy(dear, state).decide([AttemptState(0, T0)], T0, T0 + 30) == Start(0, t(3.0), "duplicate")


def test_1_hung_attempts_are_censored_not_answers():
    # 10 answers at 1.0 s, 10 at 2.0 s and 10 attempts given up at 1.5 s without a first token. Taking
    # those as answers at 1.5 s would put the median there; they are only known to be slower than 1.5 s.
    state = tail(warm={KEYS[1]: (0.8, 2.0), KEYS[2]: (0.5, 1.0)})
    for ttft in [1.0] * 10 + [2.0] * 10:
        state.stats.observe(KEYS[0], "ok", ttft, ttft + 2.0)
    for _ in range(10):
        state.stats.observe(KEYS[0], "censored", 1.5, 1.5, ttft_censored=True)
    assert state.stats.quantile(KEYS[0], "ttft", 0.5) == 2.0
    half = CONFIG.model_copy(update={"max_extra_load": 0.5})
    assert policy(half, state).decide([AttemptState(0, T0)], T0, T0 + 30) == Start(0, t(2.0), "duplicate")


# ---- 2. recovery does not consume the hedge cap ------------------------------------------------------------


def test_2_invalid_duplicates_do_not_use_up_the_cap():
    # The primary straggles; both duplicates come back invalid; the step recovers at once on the next
    # rungs (an invalid answer goes down the ladder), instead of waiting for the straggler.
    events = play(policy(), [straggles(14.0), invalid(0.3), invalid(0.3), answers(0.9)], t(30))
    assert events == [
        (t(0), "start", 0, "primary"),
        (t(1.0), "start", 0, "duplicate"),
        (t(1.3), "start", 1, "retry"),
        (t(1.6), "start", 2, "retry"),
        (t(2.0), "cancel", 0, "stalled"),  # the primary had no first token by 2 x its trigger
        (t(2.5), "won", 3),
    ]


# ---- 3. a straggling duplicate is backed up, and attempts that all hang are not a healthy model ----------


def test_3_stragglers_at_the_cap_make_room_and_the_step_moves_on():
    # Everything on strong hangs. The cap of two duplicates is reached at 2.0 s; the oldest attempt
    # without a first token is killed to make room and the backups go on down the ladder.
    p = policy(CONFIG.model_copy(update={"timeout_factor": 10.0}))
    events = play(p, [HANG, HANG, HANG, answers(1.0)], t(30))
    assert events == [
        (t(0), "start", 0, "primary"),
        (t(1.0), "start", 0, "duplicate"),
        (t(2.0), "start", 1, "duplicate"),  # the duplicate on strong is late the same way: another rung
        (t(2.8), "cancel", 0, "stalled"),  # the cap is reached and nobody has a first token
        (t(2.8), "start", 2, "retry"),
        (t(3.8), "won", 3),
    ]


def test_3_hung_attempts_killed_by_their_timeout_count_against_the_models_health():
    state = tail()
    for _ in range(4):
        state.stats.observe(KEYS[0], "censored", 2.0, 2.0, ttft_censored=True, timed_out=True)
    health = state.stats.health(KEYS[0])
    assert health.unhealthy and health.failure_rate == 4 / 9


# ---- 4. transient errors are retried while the deadline allows ------------------------------------------


def test_4_transient_errors_are_retried_with_backoff_not_given_up():
    # A 429 (retry-after 1 s) on strong, then 500s: the same rungs again with backoff, not
    # "no model left to try" after a third of a second.
    two_rungs = [LADDER[0], LADDER[1]]
    p = HedgingPolicy(two_rungs, CONFIG, tail(), step_id="s", expected_tokens=[500, 500])
    script = [
        fails(0.1, err(ErrorKind.RATE_LIMITED, 1.0)),
        fails(0.1, err(ErrorKind.SERVER_ERROR)),
        fails(0.1, err(ErrorKind.SERVER_ERROR)),
        fails(0.1, err(ErrorKind.SERVER_ERROR)),
        answers(1.0),
    ]
    events = play(p, script, t(30))
    assert events == [
        (t(0), "start", 0, "primary"),
        (t(1.1), "start", 0, "retry"),  # the retry-after fits: the same model when it said
        (t(1.2), "start", 0, "retry"),  # the first retry of a 500 at once
        (t(1.55), "start", 0, "retry"),  # then backoff: 0.25 s ...
        (t(2.15), "start", 0, "retry"),  # ... doubling
        (t(3.15), "won", 4),
    ]


# ---- 5. an attempt timeout without hedging -----------------------------------------------------------------


@pytest.mark.parametrize("off", [{"enabled": False}, {"side_effect": True}])
def test_5_sequential_policy_kills_a_hung_call_and_retries(off):
    config = CONFIG.model_copy(update={"enabled": off.get("enabled", True)})
    p = policy(config, side_effect=off.get("side_effect", False))
    events = play(p, [HANG, answers(3.0)], t(30))
    assert events == [
        (t(0), "start", 0, "primary"),
        (t(2.0), "cancel", 0, "stalled"),  # no first token by 2 x strong's TTFT trigger
        (t(2.0), "start", 1, "retry"),  # a timeout moves to the next rung
        (t(5.0), "won", 1),
    ]


def test_5_sequential_policy_kills_a_stalled_stream():
    p = policy(CONFIG.model_copy(update={"enabled": False}))
    events = play(p, [Does(None, VALID, 0.5, stall_after=0.5), answers(1.0)], t(30))
    assert events == [
        (t(0), "start", 0, "primary"),
        (t(5.0), "cancel", 0, "stalled"),  # silent since 1.0 s, for 2 x the 2 s stall gap
        (t(5.0), "start", 1, "retry"),
        (t(6.0), "won", 1),
    ]


# ---- 6. attempts that cannot finish are not started --------------------------------------------------------


def test_6_a_duplicate_that_cannot_finish_goes_to_a_rung_that_can():
    # 3 s left when the trigger fires: strong needs 4 s (its p90), mid 2 s.
    events = play(policy(), [straggles(5.0), answers(1.5)], t(4.0))
    assert events[:2] == [(t(0), "start", 0, "primary"), (t(1.0), "start", 1, "duplicate")]


def test_6_no_duplicate_when_no_rung_can_finish():
    # The primary's stream falls silent at 2.0 s; 0.5 s are left when the stall gap has passed and even
    # fast needs 1 s. Wait on the primary.
    events = play(policy(), [Does(4.4, VALID, 0.5, stall_after=1.5)], t(4.5))
    assert events == [(t(0), "start", 0, "primary"), (t(4.4), "won", 0)]


# ---- 7. brownout: duplicates move off a slowed model ----------------------------------------------------


def test_7_duplicates_of_a_slowed_model_go_elsewhere():
    clock = FakeClock()
    state = tail()
    state.stats = LatencyStats(LatencyConfig(min_samples=5, window_s=600, recent_s=10), clock)
    for key, (ttft, latency) in WARM.items():
        for _ in range(5):
            state.stats.observe(key, "ok", ttft, latency)
    clock.advance(30.0)
    for _ in range(4):  # strong's recent answers are 6x slower
        state.stats.observe(KEYS[0], "ok", 6.0, 24.0)
    events = play(policy(state=state), [Does(24.0, VALID, 6.0), answers(2.0)], t(30))
    # Backed up against its prior (2.0 s x 1.5) while an alternative is healthy, and not on itself.
    assert events == [(t(0), "start", 0, "primary"), (t(3.0), "start", 1, "duplicate"), (t(5.0), "won", 1)]


def test_7_a_model_whose_attempts_time_out_loses_its_duplicates_before_any_slow_answer_is_in():
    # The brownout has just begun: no slow answer has come back yet, but four attempts on strong were
    # killed by their timeouts. That is evidence enough: the duplicate goes to mid. (Its TTFT p90 is
    # hidden by the censored samples: at least 2.0 s, the largest value seen, so it is backed up then.)
    state = tail()
    for _ in range(4):
        state.stats.observe(KEYS[0], "censored", 2.0, 2.0, ttft_censored=True, timed_out=True)
    events = play(policy(state=state), [Does(24.0, VALID, 6.0), answers(2.0)], t(30))
    assert events == [(t(0), "start", 0, "primary"), (t(2.0), "start", 1, "duplicate"), (t(4.0), "won", 1)]


# ---- 8. duplicates do not pile onto a silent route ----------------------------------------------------------


def test_8_silent_route_fails_over_after_the_first_timeout():
    events = play(policy(), [HANG, HANG, answers(2.0)], t(30))
    assert events == [
        (t(0), "start", 0, "primary"),
        (t(1.0), "start", 0, "duplicate"),
        (t(2.0), "cancel", 0, "stalled"),  # no first token by 2 x the trigger: killed ...
        (t(2.0), "start", 1, "retry"),  # ... and the step fails over, not onto the same model
        (t(3.0), "cancel", 1, "stalled"),
        (t(4.0), "won", 2),
    ]


def test_8_slow_first_token_model_is_left_after_its_timeout():
    # Every first token on strong takes 20 s (its window does not know yet): fail over, do not wait.
    slow = Does(24.0, VALID, 20.0)
    events = play(policy(), [slow, slow, answers(2.0)], t(30))
    assert events[-1] == (t(4.0), "won", 2)
    assert sum(1 for e in events if e[1] == "start" and e[2] == 0) == 2


# ---- 9. a 429 with a short retry-after waits for the same model ------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (1.0, [(t(0), "start", 0, "primary"), (t(1.1), "start", 0, "retry"), (t(2.1), "won", 1)]),
        # 27 s does not leave strong its 4 s in the 30 s: the next rung at once.
        (27.0, [(t(0), "start", 0, "primary"), (t(0.1), "start", 1, "retry"), (t(1.1), "won", 1)]),
    ],
)
def test_9_rate_limited_waits_when_the_retry_after_fits(retry_after, expected):
    events = play(policy(), [fails(0.1, err(ErrorKind.RATE_LIMITED, retry_after)), answers(1.0)], t(30))
    assert events == expected


# ---- 10. a stalled stream fails over; a malformed stream moves to another rung -------------------------------


def test_10_a_stalled_stream_is_backed_up_on_another_rung():
    stalled = Does(None, VALID, 0.5, stall_after=0.3)
    events = play(policy(), [stalled, answers(2.0)], t(30))
    assert events == [
        (t(0), "start", 0, "primary"),
        (t(2.8), "start", 1, "duplicate"),  # silent since 0.8 s for the 2 s stall gap: not on strong again
        (t(4.8), "won", 1),
    ]


def test_10_a_malformed_response_moves_to_another_rung():
    events = play(policy(), [fails(0.5, err(ErrorKind.MALFORMED_RESPONSE)), answers(1.0)], t(30))
    assert events == [(t(0), "start", 0, "primary"), (t(0.5), "start", 1, "retry"), (t(1.5), "won", 1)]


# ---- 11. a content-policy rejection fails the step unless the step allows another model ------------------


def test_11_content_policy_rejection_fails_the_step_by_default():
    events = play(policy(), [fails(0.4, err(ErrorKind.CONTENT_POLICY)), answers(1.0)], t(30))
    assert events == [(t(0), "start", 0, "primary"), (t(0.4), "gave_up", "content_policy")]


def test_11_a_step_may_allow_another_model_after_a_content_policy_rejection():
    p = policy(on_content_policy="next_model")
    events = play(p, [fails(0.4, err(ErrorKind.CONTENT_POLICY)), answers(1.0)], t(30))
    assert events == [(t(0), "start", 0, "primary"), (t(0.4), "start", 1, "retry"), (t(1.4), "won", 1)]


# ---- issue 13: a slow non-retryable error cancels its siblings; one reason for the same failure --------------


def test_slow_bad_request_cancels_its_siblings_on_that_model_at_once():
    events = play(policy(), [fails(1.8, err(ErrorKind.BAD_REQUEST)), HANG, answers(1.0)], t(30))
    assert events == [
        (t(0), "start", 0, "primary"),
        (t(1.0), "start", 0, "duplicate"),
        (t(1.8), "cancel", 1, "model_rejected"),  # the same request on strong will fail the same way
        (t(1.8), "start", 1, "retry"),
        (t(2.8), "won", 2),
    ]


def test_the_same_invalid_answer_ends_invalid_output_whether_or_not_retries_are_throttled():
    state = tail()
    for key in KEYS:
        for _ in range(6):
            state.throttle.record(key, failed=True)
    throttled = play(policy(state=state, max_attempts=2), [invalid(0.3)] * 4, t(30))
    free = play(policy(max_attempts=2), [invalid(0.3)] * 4, t(30))
    assert throttled[-1][1:] == free[-1][1:] == ("gave_up", FailureReason.INVALID_OUTPUT.value)
