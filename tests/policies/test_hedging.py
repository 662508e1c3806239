"""The hedging policy as tables of scenarios on fake time, with the exact start time expected.

Latency windows are warmed with identical samples, so every quantile of a model is exactly its
sample value: strong TTFT 1.0 s / latency 4.0 s, mid 0.8 / 2.0, fast 0.5 / 1.0.
"""

from __future__ import annotations

import pytest

from tailrace.engine.clock import FakeClock
from tailrace.engine.outcomes import AttemptOutcome, CancelReason, ErrorKind, FailureReason, ProviderError
from tailrace.engine.specs import HedgeConfig, ModelChoice
from tailrace.policies.attempts import AttemptState, Cancel, GiveUp, Start
from tailrace.policies.breaker import BreakerBoard, BreakerConfig
from tailrace.policies.hedging import HedgingPolicy, TailState, effective_config
from tailrace.policies.latency import LatencyConfig, LatencyStats, model_key
from tailrace.policies.throttle import ExtraTokenBudget, RetryThrottle

LADDER = [
    ModelChoice(provider="openai", model="strong", max_tokens=400, expected_ttft_s=2.0, expected_latency_s=6.0),
    ModelChoice(provider="anthropic", model="mid", max_tokens=400, expected_ttft_s=1.0, expected_latency_s=3.0),
    ModelChoice(provider="openai", model="fast", max_tokens=400, expected_ttft_s=0.6, expected_latency_s=1.5),
]
KEYS = [model_key(m.provider, m.model) for m in LADDER]
WARM = {KEYS[0]: (1.0, 4.0), KEYS[1]: (0.8, 2.0), KEYS[2]: (0.5, 1.0)}
CONFIG = HedgeConfig(
    ttft_quantile=0.9, latency_quantile=0.9, stall_gap_s=2.0, max_concurrent=2, max_duplicates=2, fit_quantile=0.9
)
T0, DEADLINE = 100.0, 130.0
TOKENS = [500, 500, 500]


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, float, str]] = []
        self.refusals: list[tuple[str, str]] = []
        self.degradations: list[tuple[str, int, str]] = []

    def duplicate_sent(self, step_id, model, delay_s, trigger):
        self.sent.append((model, round(delay_s, 6), trigger))

    def refused(self, step_id, role, by):
        self.refusals.append((role, by))

    def degraded(self, step_id, model, tier, reason):
        self.degradations.append((model, tier, reason))


def tail(warm: dict[str, tuple[float, float]] | None = WARM, clock: FakeClock | None = None) -> TailState:
    clock = clock or FakeClock()
    stats = LatencyStats(LatencyConfig(min_samples=5, window_s=600, recent_s=60), clock)
    for key, (ttft, latency) in (warm or {}).items():
        for _ in range(5):
            stats.observe(key, "ok", ttft, latency)
    return TailState(
        stats, BreakerBoard(BreakerConfig(consecutive_failures=3, cooldown_s=5.0)), RetryThrottle(), Recorder()
    )


def policy(state: TailState | None = None, config: HedgeConfig = CONFIG, **kwargs) -> HedgingPolicy:
    kwargs.setdefault("expected_tokens", TOKENS)
    return HedgingPolicy(LADDER, config, state or tail(), step_id="s", **kwargs)


def running(
    tier: int = 0, started: float = T0, first: float | None = None, last: float | None = None, role: str = "primary"
) -> AttemptState:
    return AttemptState(
        tier=tier,
        started_at=started,
        role=role,
        first_token_at=first,
        last_token_at=last if last is not None else first,
    )


def ended(
    tier: int,
    outcome: AttemptOutcome,
    at: float = T0 + 0.3,
    error: ProviderError | None = None,
    role: str = "primary",
    tokens: int = 300,
) -> AttemptState:
    return AttemptState(
        tier=tier, started_at=T0, role=role, finished_at=at, outcome=outcome, error=error, tokens=tokens
    )


def err(kind: ErrorKind, retryable: bool = True, retry_after: float | None = None) -> ProviderError:
    return ProviderError(kind=kind, retryable=retryable, retry_after_s=retry_after)


INVALID, ERROR = AttemptOutcome.INVALID, AttemptOutcome.ERROR
TIMEOUT = Cancel(0, CancelReason.STALLED, T0 + 2.0)  # strong without a first token by 2 x its 1.0 s trigger

# (name, attempts, now, expected decision)
CASES = [
    ("first attempt: primary on the strongest rung at once", [], T0, Start(0, T0, "primary")),
    ("primary slow: a duplicate is due at its TTFT quantile", [running()], T0, Start(0, T0 + 1.0, "duplicate")),
    (
        "primary slow: at the quantile the duplicate starts on the same model",
        [running()],
        T0 + 1.0,
        Start(0, T0 + 1.0, "duplicate"),
    ),
    (
        "first token in time: the next signal is a stall gap after the last token",
        [running(first=T0 + 0.5, last=T0 + 0.9)],
        T0 + 1.0,
        Start(0, T0 + 2.9, "duplicate"),
    ),
    (
        "stream stalled: a duplicate after the gap, on another model (a stall is evidence against it)",
        [running(first=T0 + 0.5, last=T0 + 0.9)],
        T0 + 2.9,
        Start(1, T0 + 2.9, "duplicate"),
    ),
    (
        "tokens flowing but no answer by the latency quantile",
        [running(first=T0 + 0.5, last=T0 + 3.9)],
        T0 + 4.0,
        Start(0, T0 + 4.0, "duplicate"),
    ),
    (
        "two attempts in flight: the limit of concurrent attempts; the next event is the primary's timeout",
        [running(), running(started=T0 + 1.0, role="duplicate")],
        T0 + 1.5,
        Cancel(0, CancelReason.STALLED, T0 + 2.0),
    ),
    (
        "no first token by twice the trigger: killed",
        [running(), running(started=T0 + 1.0, role="duplicate")],
        T0 + 2.0,
        Cancel(0, CancelReason.STALLED, T0 + 2.0),
    ),
    (
        "failure: the next attempt at once",
        [ended(0, ERROR, error=err(ErrorKind.SERVER_ERROR))],
        T0 + 0.3,
        Start(0, T0 + 0.3, "retry"),
    ),
    (
        "failure with retry-after: the retry when the provider said",
        [ended(0, ERROR, error=err(ErrorKind.SERVER_ERROR, retry_after=2.0))],
        T0 + 0.3,
        Start(0, T0 + 2.3, "retry"),
    ),
    (
        "overloaded: the next rung at once",
        [ended(0, ERROR, error=err(ErrorKind.OVERLOADED))],
        T0 + 0.3,
        Start(1, T0 + 0.3, "retry"),
    ),
    (
        "rate-limited on the last rung: that rung after its retry-after",
        [ended(2, ERROR, error=err(ErrorKind.RATE_LIMITED, retry_after=1.0))],
        T0 + 0.3,
        Start(2, T0 + 1.3, "retry"),
    ),
    ("invalid answer: the next rung at once", [ended(0, INVALID)], T0 + 0.3, Start(1, T0 + 0.3, "retry")),
    (
        "non-retryable error: never the same model again",
        [ended(0, ERROR, error=err(ErrorKind.CONTEXT_LENGTH, retryable=False))],
        T0 + 0.3,
        Start(1, T0 + 0.3, "retry"),
    ),
    (
        "retries exhausted",
        [ended(0, INVALID), ended(1, INVALID), ended(2, INVALID), ended(2, INVALID)],
        T0 + 1.0,
        GiveUp(FailureReason.INVALID_OUTPUT, "gave up after 4 failed answers"),
    ),
    ("no time left", [], DEADLINE, GiveUp(FailureReason.DEADLINE_EXCEEDED, "no time left")),
    ("a duplicate past the deadline is never planned", [running(started=DEADLINE - 0.5)], DEADLINE - 0.4, None),
    (
        "hedging's only wake-up before the deadline is the timeout",
        [running(started=DEADLINE - 2.5)],
        DEADLINE - 2.4,
        Start(0, DEADLINE - 1.5, "duplicate"),
    ),
]


@pytest.mark.parametrize(("name", "attempts", "now", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hedging_table(name, attempts, now, expected):
    assert policy().decide(attempts, now, DEADLINE) == expected


# (name, time left at the start, expected rung): strong needs 4.0 s, mid 2.0 s, fast 1.0 s (p90 latency).
LADDER_CASES = [
    ("plenty of time: the strong model", 30.0, 0),
    ("too close for the strong model: the mid one", 3.0, 1),
    ("too close for the mid model: the fast one", 1.5, 2),
    ("nothing fits: the fastest still gets the chance", 0.5, 2),
]


@pytest.mark.parametrize(("name", "left", "tier"), LADDER_CASES, ids=[c[0] for c in LADDER_CASES])
def test_deadline_too_close_drops_down_the_ladder(name, left, tier):
    state = tail()
    p = policy(state)
    decision = p.decide([], T0, T0 + left)
    assert decision == Start(tier, T0, "primary")
    p.started(decision, T0)
    assert state.events.degradations == ([] if tier == 0 else [(LADDER[tier].model, tier, "deadline")])


def test_time_share_allocates_the_critical_path_not_greedily():
    # 30 s left but this step may plan on a tenth of it (its successors need the rest): 3 s, so mid.
    assert policy(time_share=0.1).decide([], T0, DEADLINE) == Start(1, T0, "primary")
    assert policy(time_share=0.5).decide([], T0, DEADLINE) == Start(0, T0, "primary")


def test_cold_model_uses_its_prior_conservatively():
    # No samples: the duplicate waits for 1.5x the spec's TTFT prior (2.0 s), not an observed quantile.
    p = policy(tail(warm=None))
    assert p.decide([running()], T0, DEADLINE) == Start(0, T0 + 3.0, "duplicate")


def test_duplicate_delay_and_trigger_are_reported_when_it_starts():
    state = tail()
    p = policy(state)
    decision = p.decide([running()], T0 + 1.0, DEADLINE)
    p.started(decision, T0 + 1.0)
    assert state.events.sent == [("strong", 1.0, "ttft")]


def test_extra_token_budget_empty_means_no_duplicate_and_one_recorded_refusal():
    state = tail()
    p = policy(state, budget=ExtraTokenBudget(0))
    # Refused: it waits on the primary (the next event is the primary's timeout) and asks no more.
    assert p.decide([running()], T0 + 1.0, DEADLINE) == TIMEOUT
    assert p.decide([running()], T0 + 1.5, DEADLINE) == TIMEOUT
    assert p.refusals == {"extra_tokens": 1}
    assert state.events.refusals == [("duplicate", "extra_tokens")]


def test_extra_token_budget_counts_what_extra_attempts_spent():
    # A failed duplicate settled at 300 tokens and a running retry holds its expected 500: with 1,299
    # tokens of allowance another 500-token duplicate no longer fits, with 1,300 it does.
    attempts = [
        ended(0, ERROR, error=err(ErrorKind.SERVER_ERROR), tokens=300),
        ended(0, ERROR, error=err(ErrorKind.SERVER_ERROR), tokens=300, role="duplicate"),
        running(started=T0 + 0.3, role="retry"),
    ]
    assert policy(budget=ExtraTokenBudget(1299)).decide(attempts, T0 + 1.3, DEADLINE) == Cancel(
        2, CancelReason.STALLED, T0 + 2.3
    )
    assert policy(budget=ExtraTokenBudget(1300)).decide(attempts, T0 + 1.3, DEADLINE) == Start(0, T0 + 1.3, "duplicate")


def test_extra_token_budget_spent_ends_retries():
    p = policy(budget=ExtraTokenBudget(0))
    assert p.decide([ended(0, INVALID)], T0 + 0.3, DEADLINE) == GiveUp(
        FailureReason.BUDGET_EXHAUSTED, "the run's extra-token allowance is spent"
    )


def test_refusal_by_the_spend_gate_is_remembered():
    state = tail()
    p = policy(state)
    decision = p.decide([running()], T0 + 1.0, DEADLINE)
    assert decision == Start(0, T0 + 1.0, "duplicate")
    p.refused(decision, "run cost cap", T0 + 1.0)
    assert p.decide([running()], T0 + 1.1, DEADLINE) == TIMEOUT
    assert p.refusals == {"gate": 1}
    # A retry started later is a new attempt: it may be backed up again.
    assert p.decide([running(started=T0 + 2.0, role="retry")], T0 + 3.0, DEADLINE) == Start(0, T0 + 3.0, "duplicate")


@pytest.mark.parametrize("side_effect", [True])
def test_side_effect_step_is_never_duplicated(side_effect):
    p = policy(side_effect=side_effect)
    for now in (T0 + 0.5, T0 + 1.0, T0 + 1.9):
        assert p.decide([running()], now, DEADLINE) == TIMEOUT
    # ... but it is retried after a failure (the runner sends the same idempotency key).
    assert p.decide([ended(0, ERROR, error=err(ErrorKind.SERVER_ERROR))], T0 + 0.3, DEADLINE) == Start(
        0, T0 + 0.3, "retry"
    )


def test_hedging_disabled_in_config_never_duplicates():
    p = policy(config=CONFIG.model_copy(update={"enabled": False}))
    assert p.decide([running()], T0 + 1.5, DEADLINE) == TIMEOUT


def test_max_duplicates_bounds_the_duplicates_of_a_step():
    p = policy(config=CONFIG.model_copy(update={"max_duplicates": 1, "max_concurrent": 3}))
    attempts = [running(), running(started=T0 + 1.0, role="duplicate")]
    assert p.decide(attempts, T0 + 1.5, DEADLINE) == TIMEOUT
    # At the cap with both late and without a first token, the oldest makes room.
    assert p.decide(attempts, T0 + 2.0, DEADLINE) == TIMEOUT


def test_staggered_duplicates_follow_the_newest_attempt():
    p = policy(config=CONFIG.model_copy(update={"max_concurrent": 3}))
    attempts = [running(), running(started=T0 + 1.0, role="duplicate")]
    assert p.decide(attempts, T0 + 0.5, DEADLINE) == Start(0, T0 + 1.0, "duplicate")
    # The duplicate's trigger (2.0 s) is also the primary's timeout: the kill comes first.
    assert p.decide(attempts, T0 + 1.5, DEADLINE) == TIMEOUT


def test_throttled_model_sends_duplicates_to_the_next_rung():
    state = tail()
    for _ in range(6):  # 10 tokens - 6 failures = 4 <= half: retries to `strong` are throttled
        state.throttle.record(KEYS[0], failed=True)
    p = policy(state)
    decision = p.decide([running()], T0 + 1.0, DEADLINE)
    assert decision == Start(1, T0 + 1.0, "duplicate")
    p.started(decision, T0 + 1.0)
    assert state.events.degradations == [("mid", 1, "throttle")]


def test_every_model_throttled_means_no_duplicate():
    state = tail()
    for key in KEYS:
        for _ in range(6):
            state.throttle.record(key, failed=True)
    p = policy(state)
    assert p.decide([running()], T0 + 1.0, DEADLINE) == TIMEOUT
    assert p.refusals == {"throttle": 1}
    # and with nothing running, the retry waits the longest backoff (2 s) instead of adding load at once.
    assert p.decide([ended(0, ERROR, error=err(ErrorKind.OVERLOADED))], T0 + 1.0, DEADLINE) == Start(
        1, T0 + 2.3, "retry"
    )


def test_open_circuit_skips_the_model_and_probes_after_the_cool_down():
    state = tail()
    for _ in range(3):
        state.breakers.record(KEYS[0], T0, failed=True)
    assert policy(state).decide([], T0 + 1.0, DEADLINE) == Start(1, T0 + 1.0, "primary")
    # After the 5 s cool-down the circuit is half-open: one probe goes to the strong model again.
    assert policy(state).decide([], T0 + 5.0, DEADLINE) == Start(0, T0 + 5.0, "primary")


def test_failing_model_sends_duplicates_to_the_alternative():
    clock = FakeClock()
    state = tail(clock=clock)
    for _ in range(4):
        state.stats.observe(KEYS[0], "fail")
    p = policy(state)
    decision = p.decide([running()], T0 + 1.0, DEADLINE)
    assert decision == Start(1, T0 + 1.0, "duplicate")
    p.started(decision, T0 + 1.0)
    assert state.events.degradations == [("mid", 1, "unhealthy")]


def test_latency_shift_sends_duplicates_to_the_alternative():
    clock = FakeClock()
    state = tail(clock=clock)
    clock.advance(120.0)  # the warm samples are no longer recent...
    for _ in range(4):  # ... and the recent ones are 3x slower
        state.stats.observe(KEYS[0], "ok", 3.0, 12.0)
    assert state.stats.health(KEYS[0]).shifted
    # The TTFT quantile moved up with the slow samples (to 3.0 s); when it passes, the duplicate goes to mid.
    p = policy(state)
    assert p.decide([running()], T0 + 2.0, DEADLINE) == Start(0, T0 + 3.0, "duplicate")
    assert p.decide([running()], T0 + 3.0, DEADLINE) == Start(1, T0 + 3.0, "duplicate")


def test_step_config_overrides_only_what_it_sets():
    step = HedgeConfig(max_concurrent=1)
    merged = effective_config(CONFIG, step)
    assert merged.max_concurrent == 1 and merged.ttft_quantile == CONFIG.ttft_quantile
    assert effective_config(CONFIG, None) is CONFIG


def test_failing_model_still_gets_primaries_while_its_circuit_is_closed_but_retries_go_elsewhere():
    state = tail()
    for _ in range(4):
        state.stats.observe(KEYS[0], "fail")
    assert state.stats.health(KEYS[0]).unhealthy
    assert policy(state).decide([], T0, DEADLINE) == Start(0, T0, "primary")
    assert policy(state).decide([ended(0, ERROR, error=err(ErrorKind.SERVER_ERROR))], T0 + 0.3, DEADLINE) == Start(
        1, T0 + 0.3, "retry"
    )


def test_slow_stream_is_backed_up_once_it_falls_behind_the_models_decode_rate():
    state = tail()
    for _ in range(5):
        state.stats.observe(KEYS[0], "ok", 1.0, 4.0, tokens_per_s=100.0)  # median decode rate 100 tokens/s
    p = policy(state, config=CONFIG.model_copy(update={"slow_stream_factor": 0.4, "min_stream_s": 0.5}))

    def streaming(chars: int, last: float) -> AttemptState:
        return AttemptState(tier=0, started_at=T0, first_token_at=T0 + 0.5, last_token_at=last, received_chars=chars)

    # 10 tokens by now: at 40 tokens/s they must be followed by more within 0.25 s; judged after 0.5 s.
    assert p.decide([streaming(40, T0 + 0.6)], T0 + 0.6, DEADLINE) == Start(0, T0 + 1.0, "duplicate")
    # 100 tokens: healthy until T0 + 0.5 + 100/40 s.
    assert p.decide([streaming(400, T0 + 2.0)], T0 + 2.0, DEADLINE) == Start(0, T0 + 3.0, "duplicate")
    assert p.decide([streaming(400, T0 + 2.0)], T0 + 3.0, DEADLINE) == Start(0, T0 + 3.0, "duplicate")


@pytest.mark.parametrize(("slowed", "due"), [([0], T0 + 3.0), ([0, 1, 2], T0 + 5.0)])
def test_a_slowed_model_is_backed_up_against_its_prior_only_while_an_alternative_is_healthy(slowed, due):
    clock = FakeClock()
    state = tail(clock=clock)
    clock.advance(120.0)
    for tier in slowed:
        for _ in range(4):
            state.stats.observe(KEYS[tier], "ok", 5.0, 20.0)
    # strong: observed TTFT p90 is now 5.0 s; its prior says 2.0 s (x1.5 = 3.0 s to back it up).
    assert policy(state).decide([running()], T0, DEADLINE) == Start(0, due, "duplicate")


def test_a_refused_connection_closes_every_model_behind_that_endpoint_at_once():
    refused = ProviderError(
        kind=ErrorKind.CONNECTION, retryable=True, message="connection refused", endpoint="http://127.0.0.1:9/v1"
    )
    # The strong openai model's endpoint refused: not retried there, nor on openai's "fast" below; anthropic at once.
    first = [ended(0, ERROR, at=T0 + 0.01, error=refused)]
    assert policy().decide(first, T0 + 0.01, DEADLINE) == Start(1, T0 + 0.01, "retry")
    # Both endpoints refused: the step gives up now, with most of its deadline left.
    both = [*first, AttemptState(tier=1, started_at=T0 + 0.01, role="retry", finished_at=T0 + 0.02, outcome=ERROR,
                                 error=refused.model_copy(update={"endpoint": "http://127.0.0.1:9"}))]  # fmt: skip
    assert isinstance(policy().decide(both, T0 + 0.02, DEADLINE), GiveUp)
    # A connection reset after the request was sent (no endpoint) stays a transient error: retried on the same model.
    reset = [ended(0, ERROR, at=T0 + 0.01, error=err(ErrorKind.CONNECTION))]
    decision = policy().decide(reset, T0 + 0.01, DEADLINE)
    assert isinstance(decision, Start) and decision.tier == 0
