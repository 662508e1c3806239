"""The interface between the generic request handler and one API's wire format.

`server.py` acts out a `ResponsePlan` (timing, faults, disconnects); a `Wire` only turns it into
bytes and bodies: request parsing, error bodies, rate-limit headers, the full response and SSE
events. One implementation per API: `wire_openai.OpenAIWire`, `wire_anthropic.AnthropicWire`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from tailrace.engine.sim.config import Fault
from tailrace.engine.sim.planner import RequestFeatures, ResponsePlan
from tailrace.engine.sim.ratelimit import LimitSnapshot


class BadRequest(Exception):
    """The request body is unusable: becomes a 400 invalid_request_error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass
class Exchange:
    """One request/response in flight, as the wire sees it."""

    features: RequestFeatures
    plan: ResponsePlan
    request_id: str
    include_usage: bool = False
    created: int = 0  # epoch seconds, from the server's clock


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event. Compact JSON keeps many concurrent streams cheap."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class Wire(ABC):
    api: str
    request_id_header: str

    @abstractmethod
    def parse(self, body: dict[str, Any]) -> tuple[RequestFeatures, bool]:
        """Features and whether usage is wanted in the stream. Raises `BadRequest`."""

    @abstractmethod
    def error_body(
        self, fault: Fault, request_id: str, features: RequestFeatures | None, retry_after_real_s: float | None = None
    ) -> dict[str, Any]:
        """The JSON body of an error response for `fault`."""

    @abstractmethod
    def bad_request_body(self, err: BadRequest, request_id: str) -> dict[str, Any]: ...

    @abstractmethod
    def rate_limit_body(
        self,
        reason: str,
        request_id: str,
        model: str,
        snapshot: LimitSnapshot,
        requested: int,
        retry_after_real_s: float | None,
    ) -> dict[str, Any]:
        """The 429 body when a configured TPM/RPM limit rejects the request."""

    @abstractmethod
    def limit_headers(self, snapshot: LimitSnapshot, time_scale: float) -> dict[str, str]: ...

    @abstractmethod
    def response_body(self, ex: Exchange) -> dict[str, Any]:
        """The complete non-streaming answer."""

    @abstractmethod
    def prelude(self, ex: Exchange) -> list[bytes]:
        """Events sent with the headers, before any token (also what a hung stream shows)."""

    @abstractmethod
    def delta(self, ex: Exchange, text: str) -> bytes: ...

    @abstractmethod
    def finish(self, ex: Exchange, output_tokens: int) -> list[bytes]:
        """Events that end a stream normally."""

    @abstractmethod
    def stream_error(self, ex: Exchange) -> bytes:
        """An error event inside a 200 stream."""

    def full_request_id(self, plan_request_id: str) -> str:
        return f"req_{plan_request_id}"
