"""What both SDK adapters share: one streamed attempt, every SDK failure classified, never raised."""

from __future__ import annotations

from typing import Any, ClassVar

from tailrace.engine.classify import classify
from tailrace.engine.clock import Clock
from tailrace.engine.providers._sdk_errors import facts_from_exception
from tailrace.engine.providers.base import AdapterSettings, AttemptProgress, ProviderCall, RawAttempt


class StreamingAdapter:
    kind: ClassVar[str]
    errors: ClassVar[dict[str, tuple[type[BaseException], ...]]]  # facts_from_exception's type groups

    def __init__(self, settings: AdapterSettings, clock: Clock) -> None:
        self._clock = clock
        self._client = self._make_client(settings)

    def _make_client(self, settings: AdapterSettings) -> Any:
        raise NotImplementedError

    async def _stream(self, call: ProviderCall, progress: AttemptProgress) -> None:
        raise NotImplementedError

    async def attempt(self, call: ProviderCall, progress: AttemptProgress) -> RawAttempt:
        try:
            await self._stream(call, progress)
        except Exception as exc:  # SDK and transport failures only; CancelledError is BaseException
            error = classify(self.kind, facts_from_exception(exc, **self.errors), self._clock.time())
            if error.endpoint is not None:  # the request never left this machine: nothing to charge
                progress.input_tokens = progress.output_tokens = 0
            return RawAttempt.from_progress(progress, self.kind, self._clock.monotonic(), error)
        return RawAttempt.from_progress(progress, self.kind, self._clock.monotonic())

    async def aclose(self) -> None:
        await self._client.close()
