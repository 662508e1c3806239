"""Which failures are the setup's fault (no retry can fix them): one table."""

from __future__ import annotations

import pytest

from tailrace.engine.classify import FailureFacts, classify
from tailrace.engine.config_errors import attempt_fault, step_configuration_error
from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, CancelReason


def attempt(outcome, *, error=None, invalid=None, provider="openai", model="gpt-4.1", step="s", cancel=None):
    return AttemptRecord(
        run_id="r", step_id=step, attempt=0, provider=provider, model=model, started_at=0.0, ended_at=1.0,
        latency_s=1.0, outcome=outcome, error=error, invalid_reason=invalid, cancel_reason=cancel,
    )  # fmt: skip


def error(provider="openai", **facts):
    return attempt(AttemptOutcome.ERROR, error=classify(provider, FailureFacts(**facts)), provider=provider)


REFUSED = "http://127.0.0.1:9/v1/chat/completions"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            error(status=401, message="Incorrect API key provided."),
            "provider 'openai' rejected its API key (HTTP 401): Incorrect API key provided.",
        ),
        (error(status=403), "provider 'openai' rejected its API key (HTTP 403)"),
        (
            error(status=429, message="You exceeded your current quota"),
            "provider 'openai' has no quota or credit left (HTTP 429)",
        ),
        (
            error(status=404, error_code="model_not_found", message="The model `gpt-9` does not exist"),
            "does not serve model 'gpt-4.1' (HTTP 404)",
        ),
        (
            error(transport="connection", message=f"cannot connect to {REFUSED}: connection refused", endpoint=REFUSED),
            f"provider 'openai': cannot connect to {REFUSED}: connection refused",
        ),
        (
            attempt(AttemptOutcome.INVALID, invalid="validator:checks:ok: raised KeyError: 'x'"),
            "validator 'checks:ok' raised KeyError: 'x'",
        ),
        (
            attempt(AttemptOutcome.INVALID, invalid="validator:ticket_ok: not registered"),
            "validator 'ticket_ok' not registered",
        ),
        (
            attempt(AttemptOutcome.INVALID, invalid="validator:m:f: cannot import module 'm': ModuleNotFoundError"),
            "validator 'm:f' cannot import module",
        ),
        # Not the setup: the provider, the answer or the race.
        (error(transport="connection", message="Connection reset"), None),  # the request was sent
        (error(status=429, headers={"retry-after": "1"}), None),
        (error(status=500), None),
        (error(status=400, message="maximum context length"), None),
        (attempt(AttemptOutcome.INVALID, invalid="validator:ticket_ok: the ticket id is missing"), None),
        (attempt(AttemptOutcome.INVALID, invalid="schema: $.x: Field required"), None),
        (attempt(AttemptOutcome.VALID), None),
        (attempt(AttemptOutcome.CANCELLED, cancel=CancelReason.HEDGE_LOST), None),
    ],
)
def test_attempt_fault(record, expected):
    fault = attempt_fault(record)
    if expected is None:
        assert fault is None
    else:
        assert fault is not None and expected in fault


def test_a_step_is_misconfigured_only_when_every_finished_attempt_is():
    key = error(status=401)
    other = error("anthropic", status=401)
    flaky = error(status=500)
    lost = attempt(AttemptOutcome.CANCELLED, cancel=CancelReason.DEADLINE)
    assert step_configuration_error("s", [key, other, lost]) == (
        "step 's': provider 'openai' rejected its API key (HTTP 401); provider 'anthropic' rejected its API key (HTTP 401)"
    )
    assert step_configuration_error("s", [key, key]).count("rejected") == 1  # each fault said once
    assert step_configuration_error("s", [key, flaky]) is None
    assert step_configuration_error("s", [lost]) is None
    assert step_configuration_error("s", []) is None
