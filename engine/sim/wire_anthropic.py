"""Anthropic Messages wire format (`POST /v1/messages`), streaming and not.

Stream events in the real order: message_start (usage.input_tokens), content_block_start, ping,
content_block_delta (text_delta)..., content_block_stop, message_delta (stop_reason,
usage.output_tokens), message_stop; a mid-stream failure is an `error` event.
"""

from __future__ import annotations

from typing import Any

from tailrace.engine.sim.config import Fault
from tailrace.engine.sim.planner import Finish, RequestFeatures, make_features
from tailrace.engine.sim.ratelimit import LimitSnapshot, anthropic_headers
from tailrace.engine.sim.wire import BadRequest, Exchange, Wire, sse

STOP = {Finish.STOP: "end_turn", Finish.LENGTH: "max_tokens", Finish.REFUSAL: "refusal", Finish.FILTER: "refusal"}

# fault -> (error type, message)
ERRORS: dict[Fault, tuple[str, str]] = {
    Fault.HTTP_500: ("api_error", "Internal server error"),
    Fault.OVERLOADED: ("overloaded_error", "Overloaded"),
    Fault.RATE_LIMITED: (
        "rate_limit_error",
        "This request would exceed your organization's rate limit. Please try again later.",
    ),
    # A spend limit: same type as a rate limit but no retry-after; waiting will not help.
    Fault.QUOTA: (
        "rate_limit_error",
        "You have reached your specified API usage limits. You will regain "
        "access at the start of the next billing period.",
    ),
    Fault.CONTEXT_LENGTH: ("invalid_request_error", "prompt is too long"),
    Fault.CONTENT_POLICY: ("invalid_request_error", "Output blocked by content filtering policy"),
    Fault.AUTH: ("authentication_error", "invalid x-api-key"),
    Fault.TOO_LARGE: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
}


def _text(content: Any) -> str:
    """Text of a `system` or message `content`: a string or a list of blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _err(type_: str, message: str, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}


class AnthropicWire(Wire):
    api = "anthropic"
    request_id_header = "request-id"

    def __init__(self, wall_clock: Any) -> None:
        self._wall = wall_clock  # callable returning epoch seconds, for RFC 3339 reset times

    def parse(self, body: dict[str, Any]) -> tuple[RequestFeatures, bool]:
        model, messages, max_tokens = body.get("model"), body.get("messages"), body.get("max_tokens")
        if not isinstance(model, str) or not model:
            raise BadRequest("model: Field required", "model")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: Field required", "messages")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens: Field required", "max_tokens")
        texts = [_text(body.get("system"))] if body.get("system") else []
        texts += [_text(m.get("content")) for m in messages if isinstance(m, dict)]
        fmt = body.get("output_format") or {}
        schema = fmt.get("schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
        return make_features(
            "anthropic", model, texts, max_tokens, stream=bool(body.get("stream")), response_schema=schema
        ), True

    def error_body(
        self, fault: Fault, request_id: str, features: RequestFeatures | None, retry_after_real_s: float | None = None
    ) -> dict[str, Any]:
        type_, message = ERRORS.get(fault, ERRORS[Fault.HTTP_500])
        if fault == Fault.CONTEXT_LENGTH and features is not None:
            message = f"prompt is too long: {features.prompt_tokens + features.max_tokens} tokens > limit"
        return _err(type_, message, request_id)

    def bad_request_body(self, err: BadRequest, request_id: str) -> dict[str, Any]:
        return _err("invalid_request_error", err.message, request_id)

    def rate_limit_body(
        self,
        reason: str,
        request_id: str,
        model: str,
        snapshot: LimitSnapshot,
        requested: int,
        retry_after_real_s: float | None,
    ) -> dict[str, Any]:
        if reason == "too_large":
            return _err(
                "rate_limit_error",
                f"This request ({requested} tokens) exceeds the rate limit "
                f"of {snapshot.limit_tokens} tokens per minute for {model}.",
                request_id,
            )
        unit = "input tokens" if reason == "tokens" else "requests"
        limit = snapshot.limit_tokens if reason == "tokens" else snapshot.limit_requests
        return _err(
            "rate_limit_error",
            f"This request would exceed the rate limit for your organization "
            f"of {limit} {unit} per minute. Please retry after the time in the retry-after "
            "header.",
            request_id,
        )

    def limit_headers(self, snapshot: LimitSnapshot, time_scale: float) -> dict[str, str]:
        return anthropic_headers(snapshot, time_scale, self._wall())

    def _id(self, ex: Exchange) -> str:
        return f"msg_{ex.plan.request_id}"

    def _usage(self, ex: Exchange, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": ex.features.prompt_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }

    def response_body(self, ex: Exchange) -> dict[str, Any]:
        content = [{"type": "text", "text": ex.plan.text}] if ex.plan.text else []
        return {
            "id": self._id(ex),
            "type": "message",
            "role": "assistant",
            "model": ex.features.model,
            "content": content,
            "stop_reason": STOP[ex.plan.finish],
            "stop_sequence": None,
            "usage": self._usage(ex, ex.plan.output_tokens),
        }

    def prelude(self, ex: Exchange) -> list[bytes]:
        message = {
            "id": self._id(ex),
            "type": "message",
            "role": "assistant",
            "model": ex.features.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage(ex, 1),
        }
        return [
            sse({"type": "message_start", "message": message}, "message_start"),
            sse(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                "content_block_start",
            ),
            sse({"type": "ping"}, "ping"),
        ]

    def delta(self, ex: Exchange, text: str) -> bytes:
        return sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
            "content_block_delta",
        )

    def finish(self, ex: Exchange, output_tokens: int) -> list[bytes]:
        return [
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": STOP[ex.plan.finish], "stop_sequence": None},
                    "usage": self._usage(ex, output_tokens),
                },
                "message_delta",
            ),
            sse({"type": "message_stop"}, "message_stop"),
        ]

    def stream_error(self, ex: Exchange) -> bytes:
        return sse(_err("overloaded_error", "Overloaded", self.full_request_id(ex.plan.request_id)), "error")
