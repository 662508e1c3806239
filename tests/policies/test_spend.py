"""The one definition of what an attempt cost (`attempt_usage`): what its record says and what the ledger adds."""

from __future__ import annotations

import pytest

from tailrace.engine.outcomes import AttemptOutcome
from tailrace.policies.spend import SpendAsk, attempt_usage, wasted_tokens


def price(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * 2.0 + output_tokens * 8.0) / 1e6


ASK = SpendAsk(input_tokens=500, max_output_tokens=400, cost_usd=price(500, 400))


@pytest.mark.parametrize(
    ("outcome", "reported", "received", "expected"),
    [
        # The provider's own figures win whenever it reported them.
        (AttemptOutcome.VALID, (480, 120), 0, (480, 120)),
        (AttemptOutcome.INVALID, (480, 400), 0, (480, 400)),
        # Failed before any token (429, 5xx, reset): providers bill nothing.
        (AttemptOutcome.ERROR, (None, None), 0, (0, 0)),
        # Failed mid-stream: the prompt estimate and what arrived.
        (AttemptOutcome.ERROR, (None, None), 35, (500, 35)),
        # Cancelled (a losing duplicate, the deadline): the prompt estimate and what arrived.
        (AttemptOutcome.CANCELLED, (None, None), 0, (500, 0)),
        (AttemptOutcome.CANCELLED, (None, None), 60, (500, 60)),
    ],
)
def test_what_an_attempt_cost(outcome, reported, received, expected):
    used = attempt_usage(
        price, ASK, outcome, reported_input=reported[0], reported_output=reported[1], received_tokens=received
    )
    assert (used.input_tokens, used.output_tokens) == expected
    assert used.cost_usd == pytest.approx(price(*expected))
    assert used.reported == (reported[0] is not None)
    assert used.cancelled == (outcome == AttemptOutcome.CANCELLED)
    assert wasted_tokens(used) == (0 if outcome == AttemptOutcome.VALID else sum(expected))


def test_a_failover_after_a_503_costs_only_the_answer():
    failed = attempt_usage(
        price, ASK, AttemptOutcome.ERROR, reported_input=None, reported_output=None, received_tokens=0, status=503
    )
    answer = attempt_usage(
        price, ASK, AttemptOutcome.VALID, reported_input=480, reported_output=120, received_tokens=120
    )
    assert failed.cost_usd == 0.0 and failed.status == 503
    assert failed.cost_usd + answer.cost_usd == pytest.approx(price(480, 120))
