"""A provider adapter that answers from a `TraceFit`, on the replay's fake clock: no sockets, no Ray.

It implements the `ProviderAdapter` protocol the step runner calls (`engine.providers.base`), so the
replay runs the real runner, policies and gates against it. Per attempt it draws, at the replay's
time of the batch (brownouts come back where they were):

* an error, at its model's rate for that time, replayed from the errors the trace recorded (after
  the recorded delay, with the recorded status and retry-after);
* else an answer: the kind of attempt (usual, straggler, hang) and its time to first token and
  per-token time, from the censored mixture, times the time bin's factors; then valid or invalid
  at its step's rate, with a text the real validator judges the same way (a valid answer for the
  step's contract and the run's ids; for an invalid kind, a text that fails with that kind).

Tokens stream in chunks as the simulator sends them (at most `max_chunks` per answer), so stall and
slow-stream triggers, and what a cancelled attempt is charged, behave as they did. A call the client
would time out (`ProviderCall.timeout_s`) ends as a timeout error then. The step an attempt belongs
to comes from `CURRENT_STEP`, a context variable the replay driver sets around each step.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from tailrace.engine.clock import Clock
from tailrace.engine.errors import TailraceError
from tailrace.engine.outcomes import ErrorKind, ProviderError, StopKind
from tailrace.engine.providers.base import AttemptProgress, ProviderCall, RawAttempt
from tailrace.engine.sim.content import (
    REFUSAL_TEXT,
    alter_id,
    not_json_answer,
    schema_miss_answer,
    text_answer,
    valid_answer,
)
from tailrace.engine.specs import StepSpec
from tailrace.engine.tokens import CHARS_PER_TOKEN, estimate_prompt_tokens
from tailrace.engine.validation import contract_schema, validate
from tailrace.policies.latency import model_key
from tailrace.whatif.fit import (
    TOKENS_PER_CHUNK,
    ErrorDraw,
    ModelFit,
    StepModelFit,
    TraceFit,
    decode_tokens,
    stream_chunks,
)

ANSWER_CHARS = 320


class ReplayError(TailraceError):
    """The replay cannot reproduce something the trace needs (an answer a custom validator rejects...)."""


@dataclass(frozen=True)
class StepContext:
    run_id: str
    step: StepSpec
    inputs: Mapping[str, Any]


CURRENT_STEP: ContextVar[StepContext | None] = ContextVar("tailrace_whatif_step", default=None)


class AnswerBook:
    """Answer texts per (run, step, kind), written once and checked against the step's contract with
    the real validator: a valid one passes, an invalid one fails."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._texts: dict[tuple[str, str, str], tuple[str, StopKind]] = {}
        self._templates: dict[str, str] = {}  # step -> a valid answer with placeholders for the ids

    def forget(self, run_id: str) -> None:
        for key in [k for k in self._texts if k[0] == run_id]:
            del self._texts[key]

    def get(self, ctx: StepContext, kind: str) -> tuple[str, StopKind]:
        key = (ctx.run_id, ctx.step.id, kind)
        found = self._texts.get(key)
        if found is None:
            found = self._texts[key] = self._valid(ctx) if kind == "valid" else self._invalid(ctx, kind)
        return found

    def _ids(self, ctx: StepContext) -> list[str]:
        return [str(ctx.inputs[f]) for f in ctx.step.output.copy_ids if f in ctx.inputs]

    def _write(self, ctx: StepContext) -> str:
        return self._write_with(ctx, self._ids(ctx))

    def _write_with(self, ctx: StepContext, ids: list[str]) -> str:
        schema = contract_schema(ctx.step.output) if ctx.step.output.kind == "json" else None
        if schema is not None:
            return valid_answer(self._rng, schema, ids, ANSWER_CHARS)
        if ctx.step.output.kind == "json":
            return "{" + ", ".join(f'"id{i}": "{v}"' for i, v in enumerate(ids)) + "}"
        return text_answer(self._rng, ids, ANSWER_CHARS)

    def _from_template(self, ctx: StepContext) -> str:
        """The step's answer, written once with placeholder ids, with this run's ids put in (writing a
        fresh answer per run costs more than the rest of the attempt)."""
        ids = self._ids(ctx)
        template = self._templates.get(ctx.step.id)
        if template is None:
            placeholders = [_placeholder(i) for i in range(len(ids))]
            template = self._templates[ctx.step.id] = self._write_with(ctx, placeholders)
        json_text = ctx.step.output.kind == "json"
        for i, ident in enumerate(ids):
            template = template.replace(_placeholder(i), json.dumps(ident)[1:-1] if json_text else ident)
        return template

    def _valid(self, ctx: StepContext) -> tuple[str, StopKind]:
        text = self._from_template(ctx)
        if validate(ctx.step.output, text, StopKind.COMPLETE, ctx.inputs).ok:
            return text, StopKind.COMPLETE
        verdict = None
        for _ in range(8):
            text = self._write(ctx)
            verdict = validate(ctx.step.output, text, StopKind.COMPLETE, ctx.inputs)
            if verdict.ok:
                return text, StopKind.COMPLETE
        reason = verdict.reason if verdict is not None else "?"
        raise ReplayError(
            f"step {ctx.step.id!r}: the what-if cannot write an answer its output contract accepts ({reason}); "
            "register the step's custom validators in this process (tailrace whatif --import MODULE)"
        )

    def _invalid(self, ctx: StepContext, kind: str) -> tuple[str, StopKind]:
        valid, _ = self.get(ctx, "valid")
        schema = contract_schema(ctx.step.output) if ctx.step.output.kind == "json" else None
        ids = self._ids(ctx)
        candidates: dict[str, tuple[str, StopKind] | None] = {
            "truncated": (valid[: max(1, len(valid) // 2)], StopKind.TRUNCATED),
            "refused": (REFUSAL_TEXT, StopKind.REFUSED),
            "filtered": (valid[: max(1, len(valid) // 3)], StopKind.FILTERED),
            "tool_call": ("", StopKind.TOOL),
            "empty": ("", StopKind.COMPLETE),
            "not_json": (not_json_answer(self._rng, ids, ANSWER_CHARS), StopKind.COMPLETE) if schema else None,
            "schema": (schema_miss_answer(self._rng, schema, ids, ANSWER_CHARS), StopKind.COMPLETE) if schema else None,
        }
        if kind.startswith("missing_id"):
            altered = alter_id(self._rng, valid, ids)
            candidates[kind] = (altered, StopKind.COMPLETE) if altered is not None else None
        found = candidates.get(kind)
        if found is not None and not validate(ctx.step.output, found[0], found[1], ctx.inputs).ok:
            return found
        # A kind this contract cannot show (a custom validator's): an answer that never came to an end
        # is invalid under any contract, and invalid is what the policies act on.
        return valid, StopKind.UNKNOWN


def _placeholder(i: int) -> str:
    return f"@@ID{i}@@"


class SampledProvider:
    """The fitted trace as a provider: hands out one adapter per provider name, sharing one random
    stream, one answer book and the replay's time origin."""

    def __init__(self, fit: TraceFit, clock: Clock, seed: int, *, max_chunks: int = 20) -> None:
        self.fit = fit
        self.clock = clock
        self.rng = random.Random(seed)
        self.answers = AnswerBook(random.Random(seed ^ 0x5EED))
        self.max_chunks = max_chunks
        self.origin = clock.monotonic()
        self.idle_s = 0.0
        self.attempts = 0

    def adapter(self, kind: str) -> SampledAdapter:
        return SampledAdapter(self, kind)

    def start(self) -> None:
        """Time 0 of the batch: where the trace's first run started."""
        self.origin = self.clock.monotonic()
        self.idle_s = 0.0

    def pause(self, seconds: float) -> None:
        """The batch pauses (between the parts of a resumed trace): the providers' time, as fitted from
        the trace's busy time, stands still."""
        self.idle_s += seconds

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.origin - self.idle_s


class SampledAdapter:
    def __init__(self, provider: SampledProvider, kind: str) -> None:
        self._p = provider
        self.kind = kind

    async def aclose(self) -> None:
        return None

    async def attempt(self, call: ProviderCall, progress: AttemptProgress) -> RawAttempt:
        p = self._p
        ctx = CURRENT_STEP.get()
        if ctx is None:
            raise ReplayError("a sampled attempt outside a replayed step (CURRENT_STEP is not set)")
        key = model_key(call.provider, call.model)
        model = p.fit.models.get(key)
        if model is None:
            raise ReplayError(f"{key} is not a model of the trace's workflow: the trace says nothing about it")
        p.attempts += 1
        rng = p.rng
        state = model.regime.state_at(p.elapsed())  # normal, or degraded (a brownout)
        error = self._draw_error(model, state)
        if error is not None:
            return await self._error(call, progress, error)
        return await self._answer(call, progress, ctx, model, p.fit.steps[(ctx.step.id, key)], state, rng)

    # ---- errors -------------------------------------------------------------------------------------

    def _draw_error(self, model: ModelFit, state: int) -> ErrorDraw | None:
        rates = model.regime.error_rates[state]
        u = self._p.rng.random()
        for kind, rate in rates.items():
            if u < rate:
                draws = model.errors.get(kind)
                return self._p.rng.choice(draws) if draws else None
            u -= rate
        return None

    async def _error(self, call: ProviderCall, progress: AttemptProgress, draw: ErrorDraw) -> RawAttempt:
        clock = self._p.clock
        latency = min(draw.latency_s, call.timeout_s)
        if draw.ttft_s is not None and draw.ttft_s < latency:
            await clock.sleep(draw.ttft_s)
            progress.on_text("x" * TOKENS_PER_CHUNK * int(CHARS_PER_TOKEN), clock.monotonic())
            await clock.sleep(latency - draw.ttft_s)
        else:
            await clock.sleep(latency)
        if latency < draw.latency_s:
            return self._timeout(progress, call)
        error = ProviderError(
            kind=draw.kind,
            retryable=draw.retryable,
            status=draw.status,
            message=draw.message,
            retry_after_s=draw.retry_after_s,
        )
        return RawAttempt.from_progress(progress, self.kind, clock.monotonic(), error)

    def _timeout(self, progress: AttemptProgress, call: ProviderCall) -> RawAttempt:
        error = ProviderError(
            kind=ErrorKind.TIMEOUT, retryable=True, message=f"no answer within {call.timeout_s:.3f} s (sampled)"
        )
        return RawAttempt.from_progress(progress, self.kind, self._p.clock.monotonic(), error)

    # ---- answers ------------------------------------------------------------------------------------

    async def _answer(
        self,
        call: ProviderCall,
        progress: AttemptProgress,
        ctx: StepContext,
        model: ModelFit,
        step: StepModelFit,
        state: int,
        rng: random.Random,
    ) -> RawAttempt:
        clock = self._p.clock
        latency = model.latency
        u = rng.random()
        if u < latency.hang:
            await clock.sleep(call.timeout_s)
            return self._timeout(progress, call)
        u -= latency.hang
        component = latency.components[-1]
        for c in latency.components:
            if u < c.weight:
                component = c
                break
            u -= c.weight
        ttft = math.exp(rng.gauss(component.ttft.mu, component.ttft.sigma)) * model.regime.ttft_factor[state]
        per_token = (
            math.exp(rng.gauss(component.per_token.mu, component.per_token.sigma)) * model.regime.token_factor[state]
        )
        kind = "valid"
        if rng.random() < step.invalid_rate:
            kind = _pick(rng, step.invalid_kinds)
        tokens = self._output_tokens(rng, model, step, kind, call.max_tokens)
        text, stop_kind = self._p.answers.get(ctx, kind)
        input_tokens = (
            rng.choice(step.input_tokens) if step.input_tokens else estimate_prompt_tokens(call.system, call.prompt)
        )
        # Stream: the first chunk at the first token, the others evenly after it; the answer ends with
        # the last one (as the fit measured decode times: `decode_tokens`).
        chunks = stream_chunks(tokens, self._p.max_chunks)
        gap = per_token * decode_tokens(tokens, self._p.max_chunks) / max(1, chunks - 1)
        end = ttft + gap * max(0, chunks - 1)
        started = progress.started_mono
        if end > call.timeout_s:
            end = math.inf
        chunk_chars = max(1, int(tokens * CHARS_PER_TOKEN / chunks)) if chunks else 0
        for i in range(chunks):
            at = started + ttft + gap * i
            if at - started > call.timeout_s:
                break
            await clock.sleep(at - clock.monotonic())
            progress.on_text("x" * chunk_chars, clock.monotonic())
        if not math.isfinite(end):
            await clock.sleep(started + call.timeout_s - clock.monotonic())
            return self._timeout(progress, call)
        await clock.sleep(started + end - clock.monotonic())
        progress.input_tokens, progress.output_tokens = input_tokens, tokens
        return RawAttempt(
            text=text,
            stop_kind=stop_kind,
            input_tokens=input_tokens,
            output_tokens=tokens,
            ttft_s=ttft if tokens else None,
            latency_s=clock.monotonic() - started,
            request_id=None,
            rate_limit={},
        )

    @staticmethod
    def _output_tokens(rng: random.Random, model: ModelFit, step: StepModelFit, kind: str, max_tokens: int) -> int:
        if kind != "valid":
            ratios = model.invalid_token_ratio.get(kind)
            if ratios:
                return min(max_tokens, round(rng.choice(ratios) * max_tokens))
            if kind in ("empty", "tool_call"):
                return 0
        if step.output_tokens:
            return min(max_tokens, rng.choice(step.output_tokens))
        return max(1, max_tokens // 2)


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    u = rng.random()
    last = ""
    for name, w in weights.items():
        last = name
        if u < w:
            return name
        u -= w
    return last


__all__ = ["CURRENT_STEP", "AnswerBook", "ReplayError", "SampledAdapter", "SampledProvider", "StepContext"]
