"""The one place provider failures are classified: retryable or not, and what kind.

Adapters reduce an SDK exception (or an error event inside a stream) to `FailureFacts`; `classify`
maps facts to a `ProviderError`. Keeping this a pure function of facts lets one table test cover
every kind for both providers.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from tailrace.engine.outcomes import RETRYABLE_KINDS, ErrorKind, ProviderError

# "local": the request failed before it left this process (it could not be encoded); not a provider failure.
Transport = Literal["timeout", "connection", "malformed", "local"]

_CONTEXT_PATTERNS = re.compile(
    r"context[_ ]length|maximum context|context window|prompt is too long|too many tokens", re.I
)
_POLICY_PATTERNS = re.compile(r"content[_ ]policy|content[_ ]filter|safety system|usage polic", re.I)
_SPEND_PATTERNS = re.compile(
    r"insufficient[_ ]quota|spend limit|credit balance|billing|exceeded your current quota", re.I
)
_STREAM_ERROR_STATUS = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}
_RATE_LIMIT_HEADER_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after")


@dataclass(frozen=True)
class FailureFacts:
    status: int | None = None
    error_type: str | None = None  # OpenAI error.type / Anthropic error.type
    error_code: str | None = None  # OpenAI error.code
    message: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    transport: Transport | None = None
    endpoint: str | None = None  # the URL that could not be reached at all (nothing was sent)


def classify(provider: str, facts: FailureFacts, now_epoch: float | None = None) -> ProviderError:
    """Classify one failure of an OpenAI-format or Anthropic-format provider. `now_epoch` (the caller's
    clock) turns a Retry-After given as an HTTP date into seconds; without it such a hint is ignored."""
    kind = _kind(provider, facts)
    retry_after = retry_after_s(facts.headers, now_epoch) if kind in RETRYABLE_KINDS else None
    return ProviderError(
        kind=kind,
        retryable=kind in RETRYABLE_KINDS,
        status=facts.status,
        message=_short(facts.message),
        retry_after_s=retry_after,
        endpoint=facts.endpoint,
    )


def _kind(provider: str, f: FailureFacts) -> ErrorKind:
    if f.transport == "timeout":
        return ErrorKind.TIMEOUT
    if f.transport == "connection":
        return ErrorKind.CONNECTION
    if f.transport == "malformed":
        return ErrorKind.MALFORMED_RESPONSE
    if f.transport == "local":
        return ErrorKind.LOCAL_ERROR
    text = " ".join(x for x in (f.error_type, f.error_code, f.message) if x)
    status = f.status
    if status is None or status < 400:  # an error event inside a 200 stream
        status = _STREAM_ERROR_STATUS.get(f.error_type or "", 500)
    if status == 429:
        if _SPEND_PATTERNS.search(text):
            return ErrorKind.QUOTA_EXHAUSTED
        # Anthropic's spend-limit 429 carries no retry-after; its rate-limit 429 always does.
        if provider == "anthropic" and f.status == 429 and not _has_header(f.headers, "retry-after"):
            return ErrorKind.QUOTA_EXHAUSTED
        return ErrorKind.RATE_LIMITED
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 413:
        return ErrorKind.TOO_LARGE
    if status == 408:
        return ErrorKind.TIMEOUT
    if status in (503, 529):
        return ErrorKind.OVERLOADED
    if status >= 500 or status == 409:
        return ErrorKind.SERVER_ERROR
    if status == 400 or status == 422:
        if _CONTEXT_PATTERNS.search(text):
            return ErrorKind.CONTEXT_LENGTH
        if _POLICY_PATTERNS.search(text):
            return ErrorKind.CONTENT_POLICY
    return ErrorKind.BAD_REQUEST


def _has_header(headers: Mapping[str, str], name: str) -> bool:
    return any(k.lower() == name for k in headers)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return None


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The provider's retry hint in seconds: `retry-after-ms`, `retry-after` (seconds or HTTP date),
    else OpenAI's `x-ratelimit-reset-*` durations."""
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = _header(headers, "retry-after")
    if ra is not None:
        try:
            return max(0.0, float(ra))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(ra) if ra else None
            if parsed is not None and now is not None:
                return max(0.0, parsed.timestamp() - now)
    resets = [
        parse_duration_s(v)
        for k, v in headers.items()
        if k.lower() in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
    ]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration_s(value: str) -> float | None:
    """OpenAI's reset durations: `1s`, `6m0s`, `84ms`, `1h2m3.5s`."""
    parts = _DURATION_PART.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The rate-limit headers worth keeping on an attempt record."""
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(_RATE_LIMIT_HEADER_PREFIXES)}


_SECRET = re.compile(r"(sk-[A-Za-z0-9_*-]{4,}|Bearer\s+\S+|key[=:]\s*\S+)", re.I)


def redact_secrets(text: str) -> str:
    """Provider messages can echo part of a key ("Incorrect API key provided: sk-..."); never keep it."""
    return _SECRET.sub("[redacted]", text)


def _short(message: str, limit: int = 300) -> str:
    message = redact_secrets(message)
    return message if len(message) <= limit else message[: limit - 3] + "..."
