"""Replay: re-send one recorded attempt's exact request N times and measure how often each outcome
happens (valid, invalid by which check, refused, truncated, errors by kind).

"We cannot reproduce it" becomes a measured rate. The request (rendered prompt, system text, model
and sampling parameters), the step's output contract and the run's inputs all come from the trace,
so nothing else is needed; a trace written with `redact_prompts` cannot be replayed. Attempts go
straight through the provider adapter (no Ray), a few at a time, each with its own timeout.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailrace.cluster.results import quantile
from tailrace.cluster.trace import read_trace
from tailrace.engine.clock import SYSTEM_CLOCK, Clock, Deadline, wait_for
from tailrace.engine.errors import InputError
from tailrace.engine.outcomes import AttemptRequest
from tailrace.engine.providers.base import (
    AdapterSettings,
    AttemptProgress,
    ProviderAdapter,
    ProviderCall,
    build_adapter,
)
from tailrace.engine.specs import ModelChoice, StepSpec, WorkflowSpec
from tailrace.engine.tokens import estimate_prompt_tokens
from tailrace.engine.validation import validate


@dataclass(frozen=True)
class ReplayTarget:
    workflow: WorkflowSpec
    step: StepSpec
    request: AttemptRequest
    inputs: dict[str, Any]
    run_id: str
    attempt: int
    recorded: str  # what the recorded attempt's outcome was


@dataclass
class ReplayResult:
    target: ReplayTarget
    n: int
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def rates(self) -> list[tuple[str, int, float, float, float]]:
        """(outcome, count, rate, 95% Wilson low, high), most frequent first."""
        return [(k, c, c / self.n, *wilson(c, self.n)) for k, c in self.outcomes.most_common()]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load_target(trace: str | Path, step: str, run_id: str | None = None, attempt: int | None = None) -> ReplayTarget:
    """The first recorded attempt of `step` (of `run_id`, number `attempt`, when given) with its
    workflow and run inputs."""
    workflow_json: dict[str, Any] | None = None
    inputs: dict[str, dict[str, Any]] = {}
    redacted = False
    for line in read_trace(trace):
        kind = line.get("kind")
        if kind == "batch":
            workflow_json, redacted = line["workflow"], bool(line.get("redact_prompts"))
        elif kind == "run":
            inputs[line["run_id"]] = line.get("inputs") or {}
        elif kind == "attempt" and line["step_id"] == step:
            if run_id is not None and line["run_id"] != run_id:
                continue
            if attempt is not None and line["attempt"] != attempt:
                continue
            if redacted or line.get("request") is None:
                raise InputError(
                    f"{trace}: the request of step {step!r} was not recorded or was redacted "
                    "(the trace was written with redact_prompts); it cannot be replayed"
                )
            if workflow_json is None:
                raise InputError(f"{trace}: no workflow header line before the attempts")
            workflow = WorkflowSpec.model_validate(workflow_json)
            return ReplayTarget(
                workflow,
                workflow.step(step),
                AttemptRequest.model_validate(line["request"]),
                inputs.get(line["run_id"], {}),
                line["run_id"],
                line["attempt"],
                _recorded(line),
            )
    which = f"step {step!r}" + (f" of run {run_id!r}" if run_id else "") + (f" attempt {attempt}" if attempt else "")
    raise InputError(f"{trace}: no recorded attempt of {which}")


def _recorded(line: Mapping[str, Any]) -> str:
    if line["outcome"] == "invalid":
        return f"invalid: {line.get('invalid_reason')}"
    if line["outcome"] == "error" and line.get("error"):
        return f"error: {line['error']['kind']}"
    return str(line["outcome"])


def classify(error_kind: str | None, ok: bool, reason: str | None) -> str:
    """One replay's outcome label."""
    if error_kind is not None:
        return f"error: {error_kind}"
    if ok:
        return "valid"
    reason = reason or "invalid"
    if reason in ("truncated", "refused", "filtered"):
        return reason
    if reason.startswith("schema"):
        return "invalid: schema"
    if reason.startswith("validator:"):
        return "invalid: " + ":".join(reason.split(":")[:2])
    return f"invalid: {reason}"


def worst_case_cost_usd(target: ReplayTarget, n: int) -> float:
    choice = _choice(target)
    if choice is None:
        return 0.0
    prompt_tokens = estimate_prompt_tokens(target.request.system, target.request.prompt)
    return n * choice.cost_usd(prompt_tokens, target.request.max_tokens)


def _choice(target: ReplayTarget) -> ModelChoice | None:
    r = target.request
    return next((m for m in target.step.models if m.provider == r.provider and m.model == r.model), None)


async def replay(
    target: ReplayTarget,
    adapter: ProviderAdapter,
    n: int,
    *,
    concurrency: int = 8,
    timeout_s: float = 120.0,
    clock: Clock = SYSTEM_CLOCK,
    on_done: Callable[[], None] | None = None,
) -> ReplayResult:
    r = target.request
    call = ProviderCall(
        provider=r.provider,
        kind=r.kind,
        model=r.model,
        prompt=r.prompt,
        system=r.system,
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        timeout_s=timeout_s,
    )
    choice = _choice(target)
    result = ReplayResult(target, n)
    gate = asyncio.Semaphore(concurrency)

    async def once() -> None:
        try:
            await attempt()
        finally:
            if on_done is not None:
                on_done()

    async def attempt() -> None:
        async with gate:
            progress = AttemptProgress(clock.monotonic())
            try:
                raw = await wait_for(adapter.attempt(call, progress), Deadline.after(timeout_s, clock))
            except TimeoutError:
                result.outcomes["error: timeout"] += 1
                return
            if raw.error is not None:
                label = classify(raw.error.kind.value, False, None)
            else:
                verdict = validate(target.step.output, raw.text, raw.stop_kind, target.inputs)
                label = classify(None, verdict.ok, verdict.reason)
            result.outcomes[label] += 1
            result.latencies_s.append(raw.latency_s)
            result.input_tokens += raw.input_tokens or 0
            result.output_tokens += raw.output_tokens or 0
            if choice is not None:
                result.cost_usd += choice.cost_usd(raw.input_tokens or 0, raw.output_tokens or 0)

    await asyncio.gather(*(once() for _ in range(n)))
    return result


def run_replay(
    target: ReplayTarget,
    providers: Mapping[str, AdapterSettings],
    n: int,
    concurrency: int = 8,
    on_done: Callable[[], None] | None = None,
) -> ReplayResult:
    """Replay `n` times; `on_done` hears each replay end (a progress bar)."""
    settings = providers.get(target.request.provider)
    if settings is None:
        raise InputError(f"provider {target.request.provider!r} is not configured for this workflow")

    async def go() -> ReplayResult:
        adapter = build_adapter(settings, SYSTEM_CLOCK)
        try:
            return await replay(target, adapter, n, concurrency=concurrency, on_done=on_done)
        finally:
            await adapter.aclose()

    return asyncio.run(go())


def render(result: ReplayResult) -> list[object]:
    from rich.table import Table

    t = result.target
    table = Table(
        title=f"replay of {t.step.id} ({t.request.model}) x{result.n}: run {t.run_id} attempt "
        f"{t.attempt}, recorded {t.recorded}"
    )
    for column in ("outcome", "count", "rate", "95% interval"):
        table.add_column(column, justify="left" if column == "outcome" else "right")
    for label, count, rate, low, high in result.rates():
        table.add_row(label, str(count), f"{rate:.1%}", f"{low:.1%} - {high:.1%}")
    lat = sorted(result.latencies_s)
    table.caption = (
        f"latency p50 {quantile(lat, 0.5):.2f} s, p90 {quantile(lat, 0.9):.2f} s; "
        f"tokens {result.input_tokens:,} in / {result.output_tokens:,} out; cost ${result.cost_usd:.4f}"
    )
    return [table]
