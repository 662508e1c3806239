"""Typed records of what happened: one per attempt, one per step, one per run.

Every run ends delivered or failed with exactly one `FailureReason`, and carries every attempt.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StopKind(StrEnum):
    """Why the model stopped, normalised across providers."""

    COMPLETE = "complete"
    TRUNCATED = "truncated"
    REFUSED = "refused"
    FILTERED = "filtered"
    TOOL = "tool"
    UNKNOWN = "unknown"  # the stream ended without a stop reason


class ErrorKind(StrEnum):
    RATE_LIMITED = "rate_limited"  # 429 with a retry hint
    OVERLOADED = "overloaded"  # 503 / 529
    SERVER_ERROR = "server_error"  # 500 / 502 / other 5xx, errors inside a 200 stream
    CONNECTION = "connection"  # reset, refused, closed mid-stream
    TIMEOUT = "timeout"  # no answer in the attempt's time
    CONTEXT_LENGTH = "context_length"  # 400: prompt too long for this model
    CONTENT_POLICY = "content_policy"  # 400: the provider refuses the request
    AUTH = "auth"  # 401 / 403
    QUOTA_EXHAUSTED = "quota_exhausted"  # insufficient quota / spend limit: never succeeds
    TOO_LARGE = "too_large"  # 413
    BAD_REQUEST = "bad_request"  # other 4xx
    MALFORMED_RESPONSE = "malformed_response"  # the provider answered something we cannot parse
    # The request could not be built or encoded here (text no request can carry): nothing was sent,
    # so it is not the provider's failure and retrying cannot help.
    LOCAL_ERROR = "local_error"


RETRYABLE_KINDS = frozenset(
    {
        ErrorKind.RATE_LIMITED,
        ErrorKind.OVERLOADED,
        ErrorKind.SERVER_ERROR,
        ErrorKind.CONNECTION,
        ErrorKind.TIMEOUT,
        ErrorKind.MALFORMED_RESPONSE,
    }
)
# Errors that say "this model will not do it": try the next model, never the same one again.
MODEL_SPECIFIC_KINDS = frozenset({ErrorKind.CONTEXT_LENGTH, ErrorKind.CONTENT_POLICY, ErrorKind.TOO_LARGE})


class ProviderError(BaseModel):
    """A classified provider failure."""

    model_config = ConfigDict(frozen=True)

    kind: ErrorKind
    retryable: bool
    status: int | None = None
    message: str = ""
    retry_after_s: float | None = None
    # Set when the provider's endpoint could not be reached at all (refused, no such host): nothing was
    # sent, so nothing is charged; a base URL that refuses every connection is a configuration error.
    endpoint: str | None = None


class AttemptOutcome(StrEnum):
    VALID = "valid"  # passed the quality floor
    INVALID = "invalid"  # an answer that failed validation
    ERROR = "error"  # a classified provider error
    CANCELLED = "cancelled"  # stopped by us; see cancel_reason


class CancelReason(StrEnum):
    DEADLINE = "deadline"
    HEDGE_LOST = "hedge_lost"
    BUDGET = "budget"
    RUN_FAILED = "run_failed"  # another step of the run failed; this work can no longer be used
    SHUTDOWN = "shutdown"
    STALLED = "stalled"  # no first token, or a silent stream, past the attempt's timeout: killed, retried
    MODEL_REJECTED = "model_rejected"  # a sibling on the same model got a non-retryable error
    # The executor running it died (its node was lost): the attempt's end is unknown; it is recorded
    # from the executor's start report, settled as its whole reservation.
    EXECUTOR_LOST = "executor_lost"


class FailureReason(StrEnum):
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INVALID_OUTPUT = "invalid_output"
    PROVIDER_ERROR = "provider_error"
    BUDGET_EXHAUSTED = "budget_exhausted"
    CANCELLED = "cancelled"
    CONTENT_POLICY = "content_policy"  # the provider refused the request on policy (not retried by default)
    # The run's input cannot make a request: a record that is not usable (its line is in the detail),
    # a template path the input does not have, text that cannot be encoded. No request was sent.
    INVALID_INPUT = "invalid_input"
    # Every attempt of a step failed the same way no retry can fix: a key the provider rejects, an unknown
    # model, an endpoint that refuses connections, a validator that is missing or raises (see
    # `tailrace.engine.config_errors`). A batch stops at the first one.
    CONFIGURATION_ERROR = "configuration_error"


class AttemptRequest(BaseModel):
    """The exact request one attempt sent (rendered prompt and sampling parameters), for replay.

    Travels back with the attempt record; results files leave it out and traces keep it (prompt
    text redacted when configured). Headers and keys are never part of it.
    """

    provider: str
    kind: str  # openai | anthropic
    model: str
    prompt: str
    system: str | None = None
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None


class AttemptRecord(BaseModel):
    """One call to one model, whatever became of it."""

    run_id: str
    step_id: str
    attempt: int  # 0-based within the step
    provider: str
    model: str
    tier: int = 0  # index in the step's model ladder; > 0 means degraded
    role: str = "primary"  # primary | retry | duplicate
    started_at: float  # wall-clock epoch seconds
    ended_at: float
    ttft_s: float | None = None
    latency_s: float
    input_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False  # False when tokens are our estimate (e.g. cancelled mid-stream)
    cost_usd: float = 0.0
    stop_kind: StopKind | None = None
    outcome: AttemptOutcome
    error: ProviderError | None = None
    invalid_reason: str | None = None
    cancel_reason: CancelReason | None = None
    request_id: str | None = None
    rate_limit: dict[str, str] = Field(default_factory=dict)
    idempotency_key: str | None = None
    request: AttemptRequest | None = None


class StepResult(BaseModel):
    step_id: str
    ok: bool
    output: Any = None  # text, or the parsed JSON value
    text: str | None = None
    failure: FailureReason | None = None
    detail: str | None = None
    tier: int | None = None  # which rung of the ladder answered
    model: str | None = None
    attempts: list[AttemptRecord] = Field(default_factory=list)


class RunOutcome(BaseModel):
    run_id: str
    workflow: str
    tenant: str
    delivered: bool
    failure: FailureReason | None = None
    detail: str | None = None
    failed_step: str | None = None
    outputs: dict[str, Any] = Field(default_factory=dict)
    started_at: float
    ended_at: float
    deadline_at: float
    latency_s: float
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    degraded_steps: dict[str, str] = Field(default_factory=dict)  # step -> model that answered
    attempts: list[AttemptRecord] = Field(default_factory=list)

    @property
    def on_time(self) -> bool:
        return self.delivered and self.ended_at <= self.deadline_at
