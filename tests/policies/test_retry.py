"""The sequential retry policy, as tables of attempt histories and exact decisions."""

from __future__ import annotations

import pytest

from tailrace.engine.outcomes import AttemptOutcome, ErrorKind, FailureReason, ProviderError
from tailrace.policies.attempts import AttemptState, GiveUp, Start
from tailrace.policies.retry import Rung, SequentialRetryPolicy

LADDER = [
    Rung(0, "openai", "strong", expected_latency_s=4.0),
    Rung(1, "anthropic", "mid", expected_latency_s=2.0),
    Rung(2, "openai", "fast", expected_latency_s=1.0),
]


NOW, DEADLINE = 10.0, 30.0


def err(kind: ErrorKind, retryable: bool, retry_after: float | None = None) -> ProviderError:
    return ProviderError(kind=kind, retryable=retryable, retry_after_s=retry_after)


def done(tier: int, outcome: AttemptOutcome, error: ProviderError | None = None) -> AttemptState:
    return AttemptState(tier=tier, started_at=NOW - 1.0, finished_at=NOW, outcome=outcome, error=error)


E = AttemptOutcome.ERROR

CASES = [
    ("first attempt on the strongest rung", [], NOW, Start(0, NOW, "primary")),
    ("running attempt: wait", [AttemptState(tier=0, started_at=9.0)], NOW, None),
    (
        "retryable error retries same rung after backoff",
        [done(0, E, err(ErrorKind.SERVER_ERROR, True))],
        NOW,
        Start(0, NOW + 0.05, "retry"),
    ),
    (
        "retry-after is honoured",
        [done(0, E, err(ErrorKind.RATE_LIMITED, True, 2.0))],
        NOW,
        Start(0, NOW + 2.0, "retry"),
    ),
    (
        "retry-after past the deadline moves down the ladder at once",
        [done(0, E, err(ErrorKind.RATE_LIMITED, True, 50.0))],
        NOW,
        Start(1, NOW, "retry"),
    ),
    (
        "second retryable error on a rung moves down",
        [done(0, E, err(ErrorKind.OVERLOADED, True)), done(0, E, err(ErrorKind.OVERLOADED, True))],
        NOW,
        Start(1, NOW, "retry"),
    ),
    ("invalid answer moves down at once", [done(0, AttemptOutcome.INVALID)], NOW, Start(1, NOW, "retry")),
    ("invalid on the last rung retries it", [done(2, AttemptOutcome.INVALID)], NOW, Start(2, NOW, "retry")),
    (
        "context length never retries the same model",
        [done(0, E, err(ErrorKind.CONTEXT_LENGTH, False))],
        NOW,
        Start(1, NOW, "retry"),
    ),
    (
        "auth error skips every rung on that provider",
        [done(1, E, err(ErrorKind.AUTH, False))],
        NOW,
        Start(2, NOW, "retry"),
    ),
    (
        "auth errors on both providers: give up",
        [done(1, E, err(ErrorKind.AUTH, False)), done(2, E, err(ErrorKind.AUTH, False))],
        NOW,
        GiveUp(FailureReason.PROVIDER_ERROR, "no model left to try"),
    ),
    (
        "quota on openai skips the openai rungs",
        [done(0, E, err(ErrorKind.QUOTA_EXHAUSTED, False))],
        NOW,
        Start(1, NOW, "retry"),
    ),
    ("deadline too close for the strong model: start on the mid one", [], 27.5, Start(1, 27.5, "primary")),
    ("deadline too close for the mid model: start on the fast one", [], 28.5, Start(2, 28.5, "primary")),
    ("nothing fits: the fastest rung still gets the chance", [], 29.5, Start(2, 29.5, "primary")),
    ("no time left", [], DEADLINE, GiveUp(FailureReason.DEADLINE_EXCEEDED, "no time left")),
    (
        "attempt limit reached after invalid answers",
        [
            done(0, AttemptOutcome.INVALID),
            done(1, AttemptOutcome.INVALID),
            done(2, AttemptOutcome.INVALID),
            done(2, AttemptOutcome.INVALID),
        ],
        NOW,
        GiveUp(FailureReason.INVALID_OUTPUT, "gave up after 4 attempts"),
    ),
]


def test_retry_time_is_fixed_when_the_failure_happened():
    policy = SequentialRetryPolicy(LADDER)
    history = [done(0, E, err(ErrorKind.SERVER_ERROR, True))]
    assert policy.decide(history, NOW + 0.01, DEADLINE) == Start(0, NOW + 0.05, "retry")
    assert policy.decide(history, NOW + 0.06, DEADLINE) == Start(0, NOW + 0.06, "retry")


@pytest.mark.parametrize(("name", "attempts", "now", "expected"), CASES, ids=[c[0] for c in CASES])
def test_retry_policy_table(name, attempts, now, expected):
    assert SequentialRetryPolicy(LADDER).decide(attempts, now, DEADLINE) == expected
