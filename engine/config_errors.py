"""Configuration errors: failures that no retry, duplicate or other run can fix.

A key the provider rejects (401/403), an account without quota, a model the provider does not know
(404), an endpoint that refuses connections or does not resolve, and a custom validator that is
missing or raises instead of judging the answer. Each is a fault of the setup, not of the provider:
spending every attempt of every run on it only hides it. `step_configuration_error` recognises a step
that failed on nothing else, and says what to fix in one line; the driver then ends the run as
`configuration_error` and a batch stops at the first one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, ErrorKind

_VALIDATOR_FAULT = re.compile(r"^validator:(?P<name>.+?): (?P<problem>raised .*|not registered.*|cannot .*)$")


def attempt_fault(attempt: AttemptRecord) -> str | None:
    """What is misconfigured, when this attempt failed for a reason no retry can fix; else None."""
    where = f"provider {attempt.provider!r}"
    error = attempt.error
    if attempt.outcome == AttemptOutcome.ERROR and error is not None:
        status = f"HTTP {error.status}" if error.status is not None else "no status"
        if error.kind == ErrorKind.AUTH:
            return f"{where} rejected its API key ({status}): {error.message}".rstrip(": ")
        if error.kind == ErrorKind.QUOTA_EXHAUSTED:
            return f"{where} has no quota or credit left ({status}): {error.message}".rstrip(": ")
        if error.kind == ErrorKind.BAD_REQUEST and error.status == 404:
            return f"{where} does not serve model {attempt.model!r} ({status}): {error.message}".rstrip(": ")
        if error.kind == ErrorKind.CONNECTION and error.endpoint is not None:
            return f"{where}: {error.message}"
        return None
    if attempt.outcome == AttemptOutcome.INVALID and attempt.invalid_reason:
        match = _VALIDATOR_FAULT.match(attempt.invalid_reason)
        if match is not None:
            return f"validator {match['name']!r} {match['problem']}"
    return None


def step_configuration_error(step_id: str, attempts: Iterable[AttemptRecord]) -> str | None:
    """One line naming what to fix, when every finished attempt of a failed step hit a configuration fault."""
    finished = [a for a in attempts if a.step_id == step_id and a.outcome != AttemptOutcome.CANCELLED]
    faults = [attempt_fault(a) for a in finished]
    if not finished or any(f is None for f in faults):
        return None
    distinct = list(dict.fromkeys(f for f in faults if f is not None))
    return f"step {step_id!r}: " + "; ".join(distinct)
