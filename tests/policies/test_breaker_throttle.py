"""Circuit breaker and retry throttle as tables of event sequences and the state they must end in."""

from __future__ import annotations

import pytest

from tailrace.policies.breaker import BreakerBoard, BreakerConfig, CircuitBreaker, CircuitState
from tailrace.policies.throttle import RetryThrottle, ThrottleConfig

CONFIG = BreakerConfig(consecutive_failures=3, failure_rate=0.5, window_s=10.0, min_requests=6, cooldown_s=5.0)
F, S = True, False

# (name, [(time, failed)], time asked, expected state)
BREAKER_CASES = [
    ("fresh breaker is closed", [], 0.0, CircuitState.CLOSED),
    ("two failures in a row: still closed", [(0, F), (1, F)], 1.0, CircuitState.CLOSED),
    ("three failures in a row: open", [(0, F), (1, F), (2, F)], 2.0, CircuitState.OPEN),
    ("a success resets the run of failures", [(0, F), (1, F), (2, S), (3, F)], 3.0, CircuitState.CLOSED),
    ("half the window failing: open", [(0, F), (1, S), (2, F), (3, S), (4, F), (5, S)], 5.0, CircuitState.OPEN),
    (
        "failures older than the window do not count",
        [(0, F), (1, S), (2, F), (13, S), (14, F), (15, S), (16, S), (17, S), (18, S)],
        18.0,
        CircuitState.CLOSED,
    ),
    ("open until the cool-down has passed", [(0, F), (1, F), (2, F)], 6.9, CircuitState.OPEN),
    ("half-open after the cool-down", [(0, F), (1, F), (2, F)], 7.0, CircuitState.HALF_OPEN),
    ("the probe succeeds: closed", [(0, F), (1, F), (2, F), (7, S)], 7.0, CircuitState.CLOSED),
    ("the probe fails: open again, for a fresh cool-down", [(0, F), (1, F), (2, F), (7, F)], 11.0, CircuitState.OPEN),
    ("... which ends 5 s after the failed probe", [(0, F), (1, F), (2, F), (7, F)], 12.0, CircuitState.HALF_OPEN),
]


@pytest.mark.parametrize(("name", "events", "at", "state"), BREAKER_CASES, ids=[c[0] for c in BREAKER_CASES])
def test_breaker_table(name, events, at, state):
    breaker = CircuitBreaker(CONFIG)
    for t, failed in events:
        breaker.record(float(t), failed)
    assert breaker.current(at) == state


def test_half_open_lets_one_probe_through_at_a_time():
    breaker = CircuitBreaker(CONFIG)
    for t in range(3):
        breaker.record(float(t), True)
    assert not breaker.allows(6.0)
    assert breaker.allows(7.0)
    breaker.started(7.0)
    assert not breaker.allows(7.1)  # the probe is out
    breaker.abandoned(7.5)  # it was cancelled: it told nothing; another may go
    assert breaker.allows(7.6)


def test_a_probe_that_loses_the_race_to_another_model_opens_the_circuit_again():
    breaker = CircuitBreaker(CONFIG)
    for t in range(3):
        breaker.record(float(t), True)
    breaker.started(7.0)  # the probe
    breaker.outrun(7.4)  # another model answered first: this one is still slower than the alternative
    assert breaker.current(7.5) == CircuitState.OPEN
    assert not breaker.allows(12.3)  # a fresh cool-down, from the lost race
    assert breaker.allows(12.4)


def test_losing_a_race_while_closed_is_just_hedging():
    breaker = CircuitBreaker(CONFIG)
    for t in range(5):
        breaker.started(float(t))
        breaker.outrun(t + 0.5)
    assert breaker.current(6.0) == CircuitState.CLOSED


def test_board_reports_every_transition():
    seen = []
    board = BreakerBoard(CONFIG, on_change=lambda model, state: seen.append((model, state)))
    for t in range(3):
        board.record("m", float(t), True)
    assert board.allows("m", 7.0)
    board.record("m", 7.5, False)
    assert seen == [("m", CircuitState.OPEN), ("m", CircuitState.HALF_OPEN), ("m", CircuitState.CLOSED)]
    assert board.allows("other", 0.0)


# (name, events as "f"/"s", expected tokens, allowed)  with max 10, ratio 0.1 (gRPC's example values)
THROTTLE_CASES = [
    ("full bucket allows", "", 10.0, True),
    ("four failures: 6 tokens, still above half", "ffff", 6.0, True),
    ("five failures: exactly half, throttled", "fffff", 5.0, False),
    ("one success gives back a tenth", "fffffs", 5.1, True),
    ("never below zero", "f" * 30, 0.0, False),
    ("never above the maximum", "s" * 5, 10.0, True),
]


@pytest.mark.parametrize(("name", "events", "tokens", "allowed"), THROTTLE_CASES, ids=[c[0] for c in THROTTLE_CASES])
def test_throttle_table(name, events, tokens, allowed):
    throttle = RetryThrottle(ThrottleConfig(max_tokens=10, token_ratio=0.1))
    for e in events:
        throttle.record("m", failed=e == "f")
    assert throttle.tokens("m") == pytest.approx(tokens)
    assert throttle.allows("m") is allowed
    assert throttle.allows("another-model")  # per target model: others are not throttled
