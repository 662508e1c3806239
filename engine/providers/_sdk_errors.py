"""Reduce either SDK's exceptions to `FailureFacts` (the two SDKs share one exception shape).

An error raised while the request is being encoded (a lone surrogate in the text, a header value
the HTTP layer cannot carry) is local: no request was sent, so it is neither the provider's failure
nor worth a retry. Anything else unrecognised is taken as a response we could not parse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import httpx2

from tailrace.engine.classify import FailureFacts, Transport

_USERINFO = re.compile(r"//[^/@\s]*@")


def facts_from_exception(
    exc: BaseException,
    timeout_types: tuple[type[BaseException], ...],
    connection_types: tuple[type[BaseException], ...],
    status_types: tuple[type[BaseException], ...],
    api_error_types: tuple[type[BaseException], ...],
) -> FailureFacts:
    if isinstance(exc, timeout_types):
        return FailureFacts(transport="timeout", message=str(exc))
    if isinstance(exc, connection_types):
        endpoint = unreachable_endpoint(exc)
        if endpoint is not None:
            return FailureFacts(
                transport="connection", message=f"cannot connect to {endpoint}: {_root_cause(exc)}", endpoint=endpoint
            )
        return FailureFacts(transport="connection", message=str(exc))
    if isinstance(exc, status_types):
        response = exc.response  # type: ignore[attr-defined]
        error = _error_object(getattr(exc, "body", None))
        return FailureFacts(
            status=response.status_code,
            error_type=_str(error.get("type")),
            error_code=_str(error.get("code")),
            message=_str(error.get("message")) or str(exc),
            headers=dict(response.headers),
        )
    if isinstance(exc, api_error_types):  # an error event inside a 200 stream
        error = _error_object(getattr(exc, "body", None))
        return FailureFacts(
            error_type=_str(error.get("type")),
            error_code=_str(error.get("code")),
            message=_str(error.get("message")) or str(exc),
        )
    transport: Transport = "local" if _is_local(exc) else "malformed"
    return FailureFacts(transport=transport, message=f"{type(exc).__name__}: {exc}")


def _is_local(exc: BaseException) -> bool:
    """The request could not be encoded: UTF-8 JSON bodies and ASCII header values raise
    `UnicodeEncodeError` before anything is sent. (Decoding a response raises `UnicodeDecodeError`:
    that one is the provider's.)"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # SDKs may wrap it
        if isinstance(current, UnicodeEncodeError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _error_object(body: Any) -> Mapping[str, Any]:
    if isinstance(body, Mapping):
        inner = body.get("error")
        return inner if isinstance(inner, Mapping) else body
    return {}


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def unreachable_endpoint(exc: BaseException) -> str | None:
    """The URL of a request that never reached its server (connection refused, unknown host), without
    any user:password part; None when the connection was made (the request may have been charged)."""
    chain = _chain(exc)
    connect = next((e for e in chain if isinstance(e, httpx2.ConnectError)), None)
    if connect is None:
        return None
    for holder in (exc, connect):
        try:
            url = str(holder.request.url)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is attached
            continue
        return _USERINFO.sub("//", url)
    return "the provider's endpoint"


def _root_cause(exc: BaseException) -> str:
    last = _chain(exc)[-1]
    if isinstance(last, ConnectionRefusedError):
        return "connection refused"
    return str(last) or type(last).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen
