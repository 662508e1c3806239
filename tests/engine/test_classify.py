"""Error classification and stop-kind normalisation, for both providers, as tables."""

from __future__ import annotations

import anthropic
import httpx2
import openai
import pytest

from tailrace.engine.classify import FailureFacts, classify, parse_duration_s, redact_secrets, retry_after_s
from tailrace.engine.outcomes import ErrorKind, StopKind
from tailrace.engine.providers import anthropic_adapter, openai_adapter
from tailrace.engine.providers._sdk_errors import facts_from_exception
from tailrace.engine.providers.base import normalise_stop

K = ErrorKind
RA = {"retry-after": "2"}

CASES = [
    # provider, facts, kind, retryable, retry_after
    ("openai", FailureFacts(status=429, error_code="rate_limit_exceeded", headers=RA), K.RATE_LIMITED, True, 2.0),
    (
        "openai",
        FailureFacts(
            status=429,
            error_type="insufficient_quota",
            error_code="insufficient_quota",
            message="You exceeded your current quota",
        ),
        K.QUOTA_EXHAUSTED,
        False,
        None,
    ),
    ("openai", FailureFacts(status=500, error_type="server_error"), K.SERVER_ERROR, True, None),
    ("openai", FailureFacts(status=502), K.SERVER_ERROR, True, None),
    ("openai", FailureFacts(status=503, error_code="server_is_overloaded"), K.OVERLOADED, True, None),
    (
        "openai",
        FailureFacts(
            status=400,
            error_code="context_length_exceeded",
            message="This model's maximum context length is 128000 tokens",
        ),
        K.CONTEXT_LENGTH,
        False,
        None,
    ),
    (
        "openai",
        FailureFacts(
            status=400, error_code="content_policy_violation", message="Your request was rejected by our safety system"
        ),
        K.CONTENT_POLICY,
        False,
        None,
    ),
    ("openai", FailureFacts(status=400, message="Invalid value for 'temperature'"), K.BAD_REQUEST, False, None),
    ("openai", FailureFacts(status=401, error_code="invalid_api_key"), K.AUTH, False, None),
    ("openai", FailureFacts(status=403), K.AUTH, False, None),
    ("openai", FailureFacts(status=413), K.TOO_LARGE, False, None),
    ("openai", FailureFacts(transport="connection", message="Connection reset by peer"), K.CONNECTION, True, None),
    ("openai", FailureFacts(transport="timeout"), K.TIMEOUT, True, None),
    ("openai", FailureFacts(transport="malformed"), K.MALFORMED_RESPONSE, True, None),
    ("anthropic", FailureFacts(transport="local"), K.LOCAL_ERROR, False, None),  # never sent: not retried
    ("openai", FailureFacts(error_type="server_error", message="stream broke"), K.SERVER_ERROR, True, None),
    ("anthropic", FailureFacts(status=429, error_type="rate_limit_error", headers=RA), K.RATE_LIMITED, True, 2.0),
    (
        "anthropic",
        FailureFacts(
            status=429, error_type="rate_limit_error", message="You have reached your specified API usage limits"
        ),
        K.QUOTA_EXHAUSTED,
        False,
        None,
    ),
    ("anthropic", FailureFacts(status=529, error_type="overloaded_error"), K.OVERLOADED, True, None),
    ("anthropic", FailureFacts(status=500, error_type="api_error"), K.SERVER_ERROR, True, None),
    ("anthropic", FailureFacts(status=503), K.OVERLOADED, True, None),
    (
        "anthropic",
        FailureFacts(
            status=400, error_type="invalid_request_error", message="prompt is too long: 210000 tokens > 200000 maximum"
        ),
        K.CONTEXT_LENGTH,
        False,
        None,
    ),
    (
        "anthropic",
        FailureFacts(
            status=400, error_type="invalid_request_error", message="Output blocked by content filtering policy"
        ),
        K.CONTENT_POLICY,
        False,
        None,
    ),
    ("anthropic", FailureFacts(status=401, error_type="authentication_error"), K.AUTH, False, None),
    ("anthropic", FailureFacts(status=403, error_type="permission_error"), K.AUTH, False, None),
    ("anthropic", FailureFacts(status=413, error_type="request_too_large"), K.TOO_LARGE, False, None),
    ("anthropic", FailureFacts(transport="connection"), K.CONNECTION, True, None),
    ("anthropic", FailureFacts(transport="timeout"), K.TIMEOUT, True, None),
    ("anthropic", FailureFacts(error_type="overloaded_error"), K.OVERLOADED, True, None),  # inside a stream
]


@pytest.mark.parametrize(("provider", "facts", "kind", "retryable", "retry_after"), CASES)
def test_classification_table(provider, facts, kind, retryable, retry_after):
    error = classify(provider, facts)
    assert (error.kind, error.retryable, error.retry_after_s) == (kind, retryable, retry_after)


STOPS = [
    ("openai", "stop", StopKind.COMPLETE),
    ("openai", "length", StopKind.TRUNCATED),
    ("openai", "content_filter", StopKind.FILTERED),
    ("openai", "tool_calls", StopKind.TOOL),
    ("openai", "function_call", StopKind.TOOL),
    ("openai", "refusal", StopKind.UNKNOWN),
    ("anthropic", "end_turn", StopKind.COMPLETE),
    ("anthropic", "stop_sequence", StopKind.COMPLETE),
    ("anthropic", "max_tokens", StopKind.TRUNCATED),
    ("anthropic", "refusal", StopKind.REFUSED),
    ("anthropic", "tool_use", StopKind.TOOL),
    ("anthropic", "model_context_window_exceeded", StopKind.TRUNCATED),
    ("anthropic", "pause_turn", StopKind.TRUNCATED),
    ("anthropic", None, StopKind.UNKNOWN),
]


@pytest.mark.parametrize(("provider", "reason", "kind"), STOPS)
def test_stop_kind_normalisation(provider, reason, kind):
    assert normalise_stop(provider, reason) == kind


def test_retry_after_sources():
    assert retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert retry_after_s({"Retry-After": "3"}) == 3.0
    assert retry_after_s({"x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-reset-requests": "84ms"}) == 360.0
    assert retry_after_s({}) is None
    assert parse_duration_s("1h2m3.5s") == 3723.5
    assert parse_duration_s("soon") is None


def test_messages_never_keep_keys():
    error = classify("openai", FailureFacts(status=401, message="Incorrect API key provided: sk-proj-abcdef123456"))
    assert "sk-proj" not in error.message and "abcdef" not in error.message
    assert "Bearer" not in redact_secrets("Authorization: Bearer abc.def")


def _response(status: int, headers: dict[str, str] | None = None) -> httpx2.Response:
    request = httpx2.Request("POST", "http://127.0.0.1/v1/x")
    return httpx2.Response(status, headers=headers or {}, request=request)


def test_facts_from_real_sdk_exceptions():
    oa = openai.RateLimitError(
        "rate limited",
        response=_response(429, {"retry-after": "1"}),
        body={"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"},
    )
    facts = facts_from_exception(oa, **openai_adapter._ERRORS)
    assert (facts.status, facts.error_code, facts.headers.get("retry-after")) == (429, "rate_limit_exceeded", "1")
    an = anthropic.InternalServerError(
        "overloaded",
        response=_response(529),
        body={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    facts = facts_from_exception(an, **anthropic_adapter._ERRORS)
    assert (facts.status, facts.error_type) == (529, "overloaded_error")
    timeout = openai.APITimeoutError(request=httpx2.Request("POST", "http://127.0.0.1/"))
    assert facts_from_exception(timeout, **openai_adapter._ERRORS).transport == "timeout"
    assert facts_from_exception(ValueError("bad json"), **openai_adapter._ERRORS).transport == "malformed"


def test_a_request_that_cannot_be_encoded_is_a_local_error_not_a_malformed_response():
    try:
        "text \ud800".encode("utf-8")
    except UnicodeEncodeError as exc:
        encode_error = exc
    wrapped = RuntimeError("while sending")
    wrapped.__cause__ = encode_error
    for exc in (encode_error, wrapped):
        assert facts_from_exception(exc, **openai_adapter._ERRORS).transport == "local"
        assert classify("openai", facts_from_exception(exc, **openai_adapter._ERRORS)).kind == ErrorKind.LOCAL_ERROR
    # Decoding a provider's bytes is the provider's problem.
    decode_error = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    assert facts_from_exception(decode_error, **anthropic_adapter._ERRORS).transport == "malformed"


def test_stream_errors_from_the_sdks_keep_their_kind():
    # anthropic 2.x: an error event inside a 200 stream arrives as APIStatusError with status 200.
    in_stream = FailureFacts(status=200, error_type="overloaded_error", message="Overloaded")
    assert classify("anthropic", in_stream).kind == ErrorKind.OVERLOADED
    dropped = httpx2.RemoteProtocolError("peer closed connection without sending complete message body")
    assert facts_from_exception(dropped, **anthropic_adapter._ERRORS).transport == "connection"
