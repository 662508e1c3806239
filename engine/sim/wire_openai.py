"""OpenAI Chat Completions wire format (`POST /v1/chat/completions`), streaming and not.

Refusals follow the real API: with structured outputs (`response_format` json_schema) the refusal
sentence goes in `message.refusal` / `delta.refusal` and `content` is null; otherwise the model just
writes the refusal sentence as its `content` (and `refusal` stays null). Either way finish_reason
is `stop`, so the engine detects a refusal by the `refusal` field or by the content failing the
contract (not JSON, ids missing).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tailrace.engine.sim.config import Fault
from tailrace.engine.sim.planner import Finish, RequestFeatures, make_features
from tailrace.engine.sim.ratelimit import LimitSnapshot, openai_headers
from tailrace.engine.sim.wire import BadRequest, Exchange, Wire, sse

FINISH = {Finish.STOP: "stop", Finish.LENGTH: "length", Finish.REFUSAL: "stop", Finish.FILTER: "content_filter"}

# fault -> (message, type, param, code)
ERRORS: dict[Fault, tuple[str, str, str | None, str | None]] = {
    Fault.HTTP_500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
        None,
    ),
    Fault.OVERLOADED: ("The server is overloaded or not ready yet.", "server_error", None, "server_is_overloaded"),
    Fault.RATE_LIMITED: (
        "Rate limit reached for requests. Please try again later.",
        "requests",
        None,
        "rate_limit_exceeded",
    ),
    Fault.QUOTA: (
        "You exceeded your current quota, please check your plan and billing details.",
        "insufficient_quota",
        None,
        "insufficient_quota",
    ),
    Fault.CONTEXT_LENGTH: (
        "This model's maximum context length is exceeded. Please reduce the length of the messages or completion.",
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
    ),
    Fault.CONTENT_POLICY: (
        "Your request was rejected as a result of our safety system.",
        "invalid_request_error",
        None,
        "content_policy_violation",
    ),
    Fault.AUTH: ("Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"),
    Fault.TOO_LARGE: ("Request too large.", "invalid_request_error", None, "request_too_large"),
}


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _err(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class OpenAIWire(Wire):
    api = "openai"
    request_id_header = "x-request-id"

    def __init__(self, default_max_tokens: int) -> None:
        self.default_max_tokens = default_max_tokens

    def parse(self, body: dict[str, Any]) -> tuple[RequestFeatures, bool]:
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", "model")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array", "messages")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens must be a positive integer", "max_tokens")
        texts = [_text(m.get("content")) for m in messages if isinstance(m, dict)]
        fmt = body.get("response_format") or {}
        schema = None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema") or {"type": "object"}
        features = make_features(
            "openai", model, texts, max_tokens, stream=bool(body.get("stream")), response_schema=schema
        )
        if isinstance(fmt, dict) and fmt.get("type") == "json_object" and features.schema is None:
            features = dataclasses.replace(features, schema={"type": "object"})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return features, include_usage

    def error_body(
        self, fault: Fault, request_id: str, features: RequestFeatures | None, retry_after_real_s: float | None = None
    ) -> dict[str, Any]:
        message, type_, param, code = ERRORS.get(fault, ERRORS[Fault.HTTP_500])
        if fault == Fault.RATE_LIMITED and retry_after_real_s is not None:
            message = f"Rate limit reached for requests. Please try again in {retry_after_real_s:.3g}s."
        return _err(message, type_, param, code)

    def bad_request_body(self, err: BadRequest, request_id: str) -> dict[str, Any]:
        return _err(err.message, "invalid_request_error", err.param, None)

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
                f"Request too large for {model} on tokens per min (TPM): Limit "
                f"{snapshot.limit_tokens}, Requested {requested}.",
                "tokens",
                None,
                "rate_limit_exceeded",
            )
        unit = "tokens per min (TPM)" if reason == "tokens" else "requests per min (RPM)"
        limit = snapshot.limit_tokens if reason == "tokens" else snapshot.limit_requests
        used = limit - (snapshot.remaining_tokens if reason == "tokens" else snapshot.remaining_requests)
        wait = f" Please try again in {retry_after_real_s:.3g}s." if retry_after_real_s is not None else ""
        return _err(
            f"Rate limit reached for {model} on {unit}: Limit {limit}, Used {used}, "
            f"Requested {requested if reason == 'tokens' else 1}.{wait}",
            reason,
            None,
            "rate_limit_exceeded",
        )

    def limit_headers(self, snapshot: LimitSnapshot, time_scale: float) -> dict[str, str]:
        return openai_headers(snapshot, time_scale)

    def _id(self, ex: Exchange) -> str:
        return f"chatcmpl-{ex.plan.request_id}"

    def _usage(self, ex: Exchange, output_tokens: int) -> dict[str, Any]:
        prompt = ex.features.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": output_tokens,
            "total_tokens": prompt + output_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def response_body(self, ex: Exchange) -> dict[str, Any]:
        plan = ex.plan
        message: dict[str, Any] = {"role": "assistant", "content": plan.text, "refusal": None, "annotations": []}
        if plan.refusal_field:
            message["content"], message["refusal"] = None, plan.text
        return {
            "id": self._id(ex),
            "object": "chat.completion",
            "created": ex.created,
            "model": ex.features.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH[plan.finish]}],
            "usage": self._usage(ex, plan.output_tokens),
            "service_tier": "default",
            "system_fingerprint": "fp_tailrace_sim",
        }

    def _chunk(self, ex: Exchange, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self._id(ex),
            "object": "chat.completion.chunk",
            "created": ex.created,
            "model": ex.features.model,
            "service_tier": "default",
            "system_fingerprint": "fp_tailrace_sim",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if ex.include_usage:
            chunk["usage"] = None  # the real API sends null on every chunk but the last
        return sse(chunk)

    def prelude(self, ex: Exchange) -> list[bytes]:
        return [self._chunk(ex, {"role": "assistant", "content": "", "refusal": None})]

    def delta(self, ex: Exchange, text: str) -> bytes:
        return self._chunk(ex, {"refusal": text} if ex.plan.refusal_field else {"content": text})

    def finish(self, ex: Exchange, output_tokens: int) -> list[bytes]:
        out = [self._chunk(ex, {}, FINISH[ex.plan.finish])]
        if ex.include_usage:
            last = {
                "id": self._id(ex),
                "object": "chat.completion.chunk",
                "created": ex.created,
                "model": ex.features.model,
                "service_tier": "default",
                "system_fingerprint": "fp_tailrace_sim",
                "choices": [],
                "usage": self._usage(ex, output_tokens),
            }
            out.append(sse(last))
        out.append(sse("[DONE]"))
        return out

    def stream_error(self, ex: Exchange) -> bytes:
        # OpenAI puts the error object in a plain `data:` line; the SDK raises APIError on it.
        return sse(_err(*ERRORS[Fault.HTTP_500]))
