"""The pure planner: what the simulator will do with one request, decided before any I/O.

`plan_response(config, features, occurrence, sim_time)` depends only on the seed, the model, the
request content, how many times this exact content was seen before (`occurrence`) and, for a
brownout, the simulated time. It never depends on global arrival order, so running requests
concurrently does not change any outcome, and a retry of the same request (occurrence + 1) gets a
fresh, independent draw.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from tailrace.engine.sim.config import ERROR_FAULTS, Fault, SimConfig
from tailrace.engine.sim.content import (
    REFUSAL_TEXT,
    alter_id,
    count_tokens,
    not_json_answer,
    parse_contract,
    schema_miss_answer,
    text_answer,
    truncate,
    valid_answer,
)

Api = Literal["openai", "anthropic"]


class Finish(StrEnum):
    """Why generation ended, before translation to each API's vocabulary."""

    STOP = "stop"  # OpenAI stop / Anthropic end_turn
    LENGTH = "length"  # OpenAI length / Anthropic max_tokens
    REFUSAL = "refusal"  # OpenAI stop (refusal text) / Anthropic refusal
    FILTER = "filter"  # OpenAI content_filter / Anthropic refusal


@dataclass(frozen=True)
class RequestFeatures:
    """The parts of a request the plan depends on, normalised across the two APIs."""

    api: Api
    model: str
    texts: tuple[str, ...]  # system text first (if any), then every message's text
    max_tokens: int
    stream: bool = False
    structured: bool = False  # OpenAI response_format json_schema (structured outputs)
    schema: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    ids: tuple[str, ...] = ()
    prompt_tokens: int = 0
    content_key: str = ""  # hash of everything above except `stream`


def make_features(
    api: Api,
    model: str,
    texts: list[str],
    max_tokens: int,
    *,
    stream: bool = False,
    response_schema: dict[str, Any] | None = None,
) -> RequestFeatures:
    """Features of a request. `response_schema` (structured outputs) wins over a `<schema>` tag."""
    schema, ids = parse_contract(texts)
    if response_schema is not None:
        schema = response_schema
    # `stream` is left out of the key on purpose: streaming must not change what is generated.
    key_src = json.dumps([api, model, texts, max_tokens, response_schema], sort_keys=True, default=str)
    return RequestFeatures(
        api=api,
        model=model,
        texts=tuple(texts),
        max_tokens=max_tokens,
        stream=stream,
        structured=response_schema is not None,
        schema=schema,
        ids=tuple(ids),
        prompt_tokens=sum(count_tokens(t) for t in texts),
        content_key=hashlib.sha256(key_src.encode()).hexdigest(),
    )


@dataclass(frozen=True)
class ResponsePlan:
    """Everything the server needs to act out one response. Durations are simulated seconds."""

    fault: Fault
    status: int  # HTTP status; 0 for a connection reset
    ttft_s: float  # until the first token (or until the error for error faults)
    tokens_per_s: float
    text: str
    output_tokens: int
    finish: Finish
    chunks: tuple[str, ...]  # `text` split for streaming
    request_id: str
    degraded: bool = False  # inside a brownout window
    stall_after_chunk: int | None = None
    stall_s: float = 0.0
    hang_after_headers: bool = False  # hang: headers (and the stream prelude) sent, then nothing
    error_after_chunk: int | None = None  # stream_error: chunks sent before it strikes
    error_as_event: bool = True  # stream_error: an SSE error event, else an abrupt close
    retry_after_s: float | None = None
    refusal_field: bool = False  # OpenAI structured outputs: the refusal goes in `refusal`

    @property
    def generation_s(self) -> float:
        return self.output_tokens / self.tokens_per_s if self.tokens_per_s > 0 else 0.0

    @property
    def total_s(self) -> float:
        return self.ttft_s + self.generation_s + self.stall_s


def _rng(config: SimConfig, features: RequestFeatures, occurrence: int, label: str) -> random.Random:
    """An independent stream per purpose, so e.g. changing fault rates leaves the text unchanged."""
    src = f"{config.seed}|{features.model}|{features.content_key}|{occurrence}|{label}"
    return random.Random(int.from_bytes(hashlib.sha256(src.encode()).digest()[:8], "big"))


def _status(fault: Fault, api: Api) -> int:
    return {
        Fault.HTTP_500: 500,
        Fault.OVERLOADED: 529 if api == "anthropic" else 503,
        Fault.RATE_LIMITED: 429,
        Fault.QUOTA: 429,
        Fault.CONTEXT_LENGTH: 400,
        Fault.CONTENT_POLICY: 400,
        Fault.AUTH: 401,
        Fault.TOO_LARGE: 413,
        Fault.RESET: 0,
    }.get(fault, 200)


def _draw_fault(rates: dict[Fault, float], u: float) -> Fault:
    acc = 0.0
    for fault in Fault:  # fixed enum order keeps draws stable whatever the dict order
        acc += rates.get(fault, 0.0)
        if u < acc:
            return fault
    return Fault.OK


def _split(text: str, n_chunks: int) -> tuple[str, ...]:
    if not text:
        return ()
    size = math.ceil(len(text) / n_chunks)
    return tuple(text[i : i + size] for i in range(0, len(text), size))


def _choose_fault(
    config: SimConfig, features: RequestFeatures, occurrence: int, sim_time: float, forced: Fault | None
) -> tuple[Fault, bool]:
    """The fault and whether the model is in a brownout window."""
    degraded = config.brownout is not None and config.brownout.degraded(features.model, sim_time)
    if forced is not None:
        return forced, degraded
    window = config.profile(features.model).context_window
    if features.prompt_tokens + features.max_tokens > window:
        return Fault.CONTEXT_LENGTH, degraded
    if (
        degraded
        and config.brownout is not None
        and _rng(config, features, occurrence, "brownout").random() < config.brownout.overloaded_rate
    ):
        return Fault.OVERLOADED, degraded
    u = _rng(config, features, occurrence, "fault").random()
    return _draw_fault(config.rates(features.model), u), degraded


def _write(fault: Fault, features: RequestFeatures, rng: random.Random, n_chars: int) -> tuple[Fault, str, Finish]:
    """The text for this fault; a fault that does not apply to the contract becomes `ok`."""
    schema, ids = features.schema, list(features.ids)

    def answer(chars: int) -> str:
        return valid_answer(rng, schema, ids, chars) if schema is not None else text_answer(rng, ids, chars)

    if fault == Fault.EMPTY:
        return fault, "", Finish.STOP
    if fault == Fault.REFUSAL:
        return fault, REFUSAL_TEXT, Finish.REFUSAL
    if fault == Fault.TRUNCATED:
        limit = features.max_tokens * 4
        full = answer(int(limit * 1.3) + 40)
        # An answer that cannot reach the limit is still cut, so it never parses as complete.
        cut = truncate(full, features.max_tokens) if len(full) > limit else full[: max(1, len(full) * 2 // 3)]
        return fault, cut, Finish.LENGTH
    if fault == Fault.FILTERED:
        full = answer(n_chars)
        return fault, full[: len(full) // 3], Finish.FILTER
    if fault == Fault.SCHEMA_MISS and schema is not None:
        return fault, schema_miss_answer(rng, schema, ids, n_chars), Finish.STOP
    if fault == Fault.NOT_JSON and schema is not None:
        return fault, not_json_answer(rng, ids, n_chars), Finish.STOP
    if fault == Fault.ALTERED_ID:
        altered = alter_id(rng, answer(n_chars), ids)
        if altered is not None:
            return fault, altered, Finish.STOP
    if fault in (Fault.SCHEMA_MISS, Fault.NOT_JSON, Fault.ALTERED_ID):
        fault = Fault.OK
    return fault, answer(n_chars), Finish.STOP


def _family(
    config: SimConfig, features: RequestFeatures, occurrence: int, median_s: float, ttft: float, tps: float
) -> tuple[float, float]:
    """(TTFT, tokens/s) reshaped by the config's latency family; lognormal leaves them as drawn."""
    model = config.latency
    if model.family == "lognormal":
        return ttft, tps
    u = _rng(config, features, occurrence, "family").random()
    if model.family == "pareto":
        # A Pareto factor with median 1: x_m * U^(-1/alpha) with x_m = 2^(-1/alpha).
        factor = (2.0 * max(u, 1e-12)) ** (-1.0 / model.pareto_alpha)
        return median_s * factor, tps
    if u < model.slow_fraction:
        return ttft * model.slow_factor, tps / model.slow_factor
    return ttft, tps


def plan_response(
    config: SimConfig,
    features: RequestFeatures,
    occurrence: int = 0,
    sim_time: float = 0.0,
    forced: Fault | None = None,
) -> ResponsePlan:
    """The full plan for one request. Pure: same arguments, same plan."""
    profile = config.profile(features.model)
    fault, degraded = _choose_fault(config, features, occurrence, sim_time, forced)
    lat = _rng(config, features, occurrence, "latency")
    ttft = profile.ttft_median_s * math.exp(lat.gauss(0.0, profile.ttft_sigma))
    tps = profile.tokens_per_s * math.exp(lat.gauss(0.0, profile.tps_sigma))
    ttft, tps = _family(config, features, occurrence, profile.ttft_median_s, ttft, tps)
    if degraded:
        ttft *= config.brownout.latency_factor if config.brownout else 1.0
        tps /= config.brownout.latency_factor if config.brownout else 1.0
    request_id = hashlib.sha256(f"{config.seed}|{features.content_key}|{occurrence}".encode()).hexdigest()[:24]
    common: dict[str, Any] = {"request_id": request_id, "degraded": degraded}

    if fault in ERROR_FAULTS or fault == Fault.RESET:
        # Errors come back faster than answers: the request is rejected before generation.
        retry = round(lat.uniform(0.5, 5.0), 3) if fault == Fault.RATE_LIMITED else None
        return ResponsePlan(
            fault=fault,
            status=_status(fault, features.api),
            ttft_s=ttft * lat.uniform(0.1, 0.5),
            tokens_per_s=tps,
            text="",
            output_tokens=0,
            finish=Finish.STOP,
            chunks=(),
            retry_after_s=retry,
            **common,
        )

    if fault == Fault.STRAGGLER:
        factor = lat.uniform(*config.straggler_factor)
        ttft, tps = ttft * factor, tps / factor

    out = _rng(config, features, occurrence, "length")
    target = profile.output_tokens_median * math.exp(out.gauss(0.0, profile.output_tokens_sigma))
    budget = max(1, math.floor(0.9 * features.max_tokens))
    n_tokens = int(min(max(8.0, target), budget))
    fault, text, finish = _write(fault, features, _rng(config, features, occurrence, "text"), n_tokens * 4)
    if finish != Finish.LENGTH and count_tokens(text) > features.max_tokens:
        # The smallest valid answer does not fit: a real model is cut off, so this one is too.
        fault, text, finish = Fault.TRUNCATED, truncate(text, features.max_tokens), Finish.LENGTH
    output_tokens = count_tokens(text)
    n_chunks = min(config.max_stream_chunks, max(1, math.ceil(output_tokens / 8)))
    chunks = _split(text, n_chunks)

    shape = _rng(config, features, occurrence, "shape")
    extra: dict[str, Any] = {}
    if fault == Fault.STALL:
        anywhere = shape.randint(1, max(1, len(chunks) - 1))
        at = config.stall_at
        extra["stall_after_chunk"] = anywhere if at is None else min(max(1, round(at * len(chunks))), len(chunks))
        extra["stall_s"] = shape.uniform(*config.stall_s)
    elif fault == Fault.HANG:
        extra["hang_after_headers"] = features.stream and shape.random() < 0.5
    elif fault == Fault.STREAM_ERROR:
        extra["error_after_chunk"] = shape.randint(1, max(1, len(chunks) - 1)) if len(chunks) > 1 else 0
        extra["error_as_event"] = shape.random() < 0.6
    if fault == Fault.REFUSAL and features.api == "openai" and features.structured:
        extra["refusal_field"] = True
    return ResponsePlan(
        fault=fault,
        status=200,
        ttft_s=ttft,
        tokens_per_s=tps,
        text=text,
        output_tokens=output_tokens,
        finish=finish,
        chunks=chunks,
        **common,
        **extra,
    )
