"""OpenAI Chat Completions on the official async SDK, streamed so TTFT and stalls are observed."""

from __future__ import annotations

from typing import Any

import httpx2
import openai

from tailrace.engine.classify import rate_limit_headers
from tailrace.engine.providers._streaming import StreamingAdapter
from tailrace.engine.providers.base import AdapterSettings, AttemptProgress, ProviderCall

_ERRORS = dict(
    timeout_types=(openai.APITimeoutError,),
    # A stream dropped mid-body can surface as a raw httpx2 transport error.
    connection_types=(openai.APIConnectionError, httpx2.TransportError),
    status_types=(openai.APIStatusError,),
    api_error_types=(openai.APIError,),
)


class OpenAIAdapter(StreamingAdapter):
    kind = "openai"
    errors = _ERRORS

    def _make_client(self, settings: AdapterSettings) -> openai.AsyncOpenAI:
        # The engine owns every retry: an SDK retry is a call no budget saw.
        return openai.AsyncOpenAI(api_key=settings.resolved_key(), base_url=settings.base_url, max_retries=0)

    async def _stream(self, call: ProviderCall, progress: AttemptProgress) -> None:
        messages: list[dict[str, Any]] = []
        if call.system:
            messages.append({"role": "system", "content": call.system})
        messages.append({"role": "user", "content": call.prompt})
        params: dict[str, Any] = {}
        if call.temperature is not None:
            params["temperature"] = call.temperature
        if call.top_p is not None:
            params["top_p"] = call.top_p
        raw = await self._client.chat.completions.with_raw_response.create(
            model=call.model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=call.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            timeout=call.timeout_s,
            extra_headers=call.headers or None,
            **params,
        )
        progress.request_id = raw.headers.get("x-request-id")
        progress.rate_limit = rate_limit_headers(raw.headers)
        stream = raw.parse()
        try:
            async for chunk in stream:
                now = self._clock.monotonic()
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta is not None:
                        progress.on_text(delta.content or "", now)
                        refusal = getattr(delta, "refusal", None)
                        if refusal:
                            progress.on_text(refusal, now)
                            progress.stop_reason = "refusal"
                    if choice.finish_reason and progress.stop_reason != "refusal":
                        progress.stop_reason = choice.finish_reason
                if chunk.usage is not None:
                    progress.input_tokens = chunk.usage.prompt_tokens
                    progress.output_tokens = chunk.usage.completion_tokens
        finally:
            await stream.close()
