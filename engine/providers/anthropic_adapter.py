"""Anthropic Messages on the official async SDK, streamed so TTFT and stalls are observed."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2

from tailrace.engine.classify import rate_limit_headers
from tailrace.engine.providers._streaming import StreamingAdapter
from tailrace.engine.providers.base import AdapterSettings, AttemptProgress, ProviderCall

_ERRORS = dict(
    timeout_types=(anthropic.APITimeoutError,),
    # Anthropic 2.x lets a dropped stream surface as a raw httpx2 transport error.
    connection_types=(anthropic.APIConnectionError, httpx2.TransportError),
    status_types=(anthropic.APIStatusError,),
    api_error_types=(anthropic.APIError,),
)


class AnthropicAdapter(StreamingAdapter):
    kind = "anthropic"
    errors = _ERRORS

    def _make_client(self, settings: AdapterSettings) -> anthropic.AsyncAnthropic:
        # The engine owns every retry: an SDK retry is a call no budget saw.
        return anthropic.AsyncAnthropic(api_key=settings.resolved_key(), base_url=settings.base_url, max_retries=0)

    async def _stream(self, call: ProviderCall, progress: AttemptProgress) -> None:
        params: dict[str, Any] = {}
        if call.system:
            params["system"] = call.system
        # anthropic 2.x dropped sampling parameters from `create`'s signature; the API still takes them.
        sampling = {k: v for k, v in (("temperature", call.temperature), ("top_p", call.top_p)) if v is not None}
        if sampling:
            params["extra_body"] = sampling
        raw = await self._client.messages.with_raw_response.create(
            model=call.model,
            max_tokens=call.max_tokens,
            messages=[{"role": "user", "content": call.prompt}],
            stream=True,
            timeout=call.timeout_s,
            extra_headers=call.headers or None,
            **params,
        )
        progress.request_id = raw.headers.get("request-id")
        progress.rate_limit = rate_limit_headers(raw.headers)
        stream = await raw.parse()
        try:
            async for event in stream:
                now = self._clock.monotonic()
                if event.type == "message_start":
                    progress.input_tokens = event.message.usage.input_tokens
                elif event.type == "content_block_delta":
                    if event.delta.type == "text_delta":
                        progress.on_text(event.delta.text, now)
                elif event.type == "message_delta":
                    progress.stop_reason = event.delta.stop_reason
                    progress.output_tokens = event.usage.output_tokens
        finally:
            await stream.close()
