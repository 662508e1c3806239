"""What every provider adapter shares: the call, live progress, the normalised attempt, stop kinds."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

from tailrace.engine.clock import Clock
from tailrace.engine.outcomes import ProviderError, StopKind

# Provider stop reasons -> normalised stop kinds. Anything unlisted is UNKNOWN.
_STOP_KINDS: dict[str, dict[str, StopKind]] = {
    "openai": {
        "stop": StopKind.COMPLETE,
        "length": StopKind.TRUNCATED,
        "content_filter": StopKind.FILTERED,
        "tool_calls": StopKind.TOOL,
        "function_call": StopKind.TOOL,
    },
    "anthropic": {
        "end_turn": StopKind.COMPLETE,
        "stop_sequence": StopKind.COMPLETE,
        "max_tokens": StopKind.TRUNCATED,
        "model_context_window_exceeded": StopKind.TRUNCATED,
        "refusal": StopKind.REFUSED,
        "tool_use": StopKind.TOOL,
        "pause_turn": StopKind.TRUNCATED,  # the answer is unfinished; continuing is not supported
    },
}


def normalise_stop(provider_kind: str, reason: str | None) -> StopKind:
    if reason is None:
        return StopKind.UNKNOWN
    return _STOP_KINDS.get(provider_kind, {}).get(reason, StopKind.UNKNOWN)


@dataclass(frozen=True)
class ProviderCall:
    """One request to one model, rendered and ready to send."""

    provider: str
    kind: str  # "openai" | "anthropic"
    model: str
    prompt: str
    max_tokens: int
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    timeout_s: float = 600.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class AttemptProgress:
    """Filled in live by the adapter, so a caller can see a stall or settle a cancelled attempt."""

    started_mono: float
    first_token_mono: float | None = None
    last_token_mono: float | None = None
    text_parts: list[str] = field(default_factory=list)
    received_chars: int = 0
    input_tokens: int | None = None  # as reported by the provider
    output_tokens: int | None = None
    stop_reason: str | None = None
    request_id: str | None = None
    rate_limit: dict[str, str] = field(default_factory=dict)

    def on_text(self, text: str, now: float) -> None:
        if not text:
            return
        if self.first_token_mono is None:
            self.first_token_mono = now
        self.last_token_mono = now
        self.text_parts.append(text)
        self.received_chars += len(text)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


@dataclass(frozen=True)
class RawAttempt:
    """The normalised result of one attempt, before validation."""

    text: str
    stop_kind: StopKind | None
    input_tokens: int | None
    output_tokens: int | None
    ttft_s: float | None
    latency_s: float
    request_id: str | None
    rate_limit: dict[str, str]
    error: ProviderError | None = None

    @classmethod
    def from_progress(
        cls, progress: AttemptProgress, kind: str, now: float, error: ProviderError | None = None
    ) -> RawAttempt:
        first = progress.first_token_mono
        ttft = None if first is None else first - progress.started_mono
        return cls(
            text=progress.text,
            stop_kind=None if error else normalise_stop(kind, progress.stop_reason),
            input_tokens=progress.input_tokens,
            output_tokens=progress.output_tokens,
            ttft_s=ttft,
            latency_s=now - progress.started_mono,
            request_id=progress.request_id,
            rate_limit=dict(progress.rate_limit),
            error=error,
        )


class ProviderAdapter(Protocol):
    kind: str

    async def attempt(self, call: ProviderCall, progress: AttemptProgress) -> RawAttempt:
        """Run one streaming attempt. Provider failures come back classified in `RawAttempt.error`;
        only `asyncio.CancelledError` propagates (and closes the HTTP stream)."""
        ...

    async def aclose(self) -> None: ...


DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
DEFAULT_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}


def api_key_for(kind: str, api_key_env: str | None) -> str | None:
    return os.environ.get(api_key_env or DEFAULT_KEY_ENV[kind])


@dataclass(frozen=True)
class AdapterSettings:
    """Everything needed to build an adapter in another process (keys are read there, from env)."""

    kind: str
    base_url: str | None = None
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)  # only for local simulators; never logged

    def resolved_key(self) -> str:
        key = self.api_key or api_key_for(self.kind, self.api_key_env)
        if not key:
            from tailrace.engine.errors import ProviderConfigError

            env = self.api_key_env or DEFAULT_KEY_ENV[self.kind]
            raise ProviderConfigError(f"no API key for a {self.kind} provider: set {env}")
        return key


def build_adapter(settings: AdapterSettings, clock: Clock) -> ProviderAdapter:
    if settings.kind == "openai":
        from tailrace.engine.providers.openai_adapter import OpenAIAdapter

        return OpenAIAdapter(settings, clock)
    if settings.kind == "anthropic":
        from tailrace.engine.providers.anthropic_adapter import AnthropicAdapter

        return AnthropicAdapter(settings, clock)
    raise ValueError(f"unknown provider kind {settings.kind!r}")
