"""The contenders of `benchmarks/tail.py`: what a user writes by hand, LiteLLM, and tailrace itself.

Both run the same workflow with the same prompts (rendered by `tailrace.engine.prompts`, so the simulator
draws the same answers for the same request) and judge answers with the same quality floor
(`tailrace.engine.validation.validate`); an invalid answer is asked again, up to 3 times per step, as a careful
user would. Steps are awaited per the DAG with asyncio. Client-side waits (SDK back-off, LiteLLM
retry delays and cool-downs) are multiplied by the simulator's time scale, so every contender lives in
the same simulated time; server-directed `retry-after` is already scaled by the simulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tailrace.engine.dag import Dag
from tailrace.engine.prompts import render_messages
from tailrace.engine.providers.base import normalise_stop
from tailrace.engine.specs import HedgeConfig, RunOptions, StepSpec, WorkflowSpec
from tailrace.engine.validation import validate

ANSWER_TRIES = 3


@dataclass
class RunResult:
    run_id: str
    ok: bool
    latency_s: float
    degraded: bool = False
    failure: str | None = None


class InvalidAnswers(Exception):
    pass


StepCall = Callable[[StepSpec, str | None, str], Awaitable[tuple[str, str | None, str]]]  # -> text, stop, kind


async def run_dag(workflow: WorkflowSpec, inputs: Mapping[str, Any], call: StepCall) -> None:
    """Every step once its dependencies are done; the parallel ones together. Raises on a failed step."""
    dag = Dag.from_spec(workflow)
    outputs: dict[str, Any] = {}
    started: set[str] = set()
    pending: dict[asyncio.Task[Any], str] = {}

    async def step(s: StepSpec) -> Any:
        upstream = {d: outputs[d] for d in dag.ancestors(s.id)}
        system, prompt = render_messages(s, s.models[0], inputs, upstream)
        for _ in range(ANSWER_TRIES):
            text, stop, kind = await call(s, system, prompt)
            verdict = validate(s.output, text, normalise_stop(kind, stop), inputs)
            if verdict.ok:
                return verdict.value
        raise InvalidAnswers(s.id)

    try:
        while len(outputs) < len(workflow.steps):
            for step_id in dag.ready(set(outputs), started):
                started.add(step_id)
                pending[asyncio.ensure_future(step(workflow.step(step_id)))] = step_id
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                outputs[pending.pop(task)] = task.result()
    finally:
        for task in pending:
            task.cancel()


async def run_all(
    records: list[tuple[str, dict[str, Any]]], concurrency: int, one: Callable[[dict[str, Any]], Awaitable[None]]
) -> list[RunResult]:
    gate = asyncio.Semaphore(concurrency)
    results: list[RunResult] = []

    async def timed(run_id: str, record: dict[str, Any]) -> None:
        async with gate:
            t0 = time.perf_counter()
            try:
                await one(record)
                results.append(RunResult(run_id, True, time.perf_counter() - t0))
            except Exception as exc:  # any failure ends the run: that is what the user's code does
                results.append(RunResult(run_id, False, time.perf_counter() - t0, failure=type(exc).__name__))

    await asyncio.gather(*(timed(run_id, record) for run_id, record in records))
    return results


class Contender:
    """Runs chunks of records in its own event loop, which lives as long as it does (clients and
    LiteLLM's router state carry over from chunk to chunk, as in a long-running service)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, records: list[tuple[str, dict[str, Any]]]) -> list[RunResult]:
        return self.loop.run_until_complete(self._run(records))

    async def _run(self, records: list[tuple[str, dict[str, Any]]]) -> list[RunResult]:
        raise NotImplementedError

    def close(self) -> None:
        # Library background tasks (LiteLLM's logging worker) end with the loop, quietly.
        async def cancel_the_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.loop.run_until_complete(cancel_the_rest())
        self.loop.close()


# ---- (a) by hand: the official SDK, a per-call timeout and its own retries -----------------------------


class HandWritten(Contender):
    def __init__(
        self, root: str, workflow: WorkflowSpec, concurrency: int, call_timeout_s: float, time_scale: float
    ) -> None:
        super().__init__()
        import openai

        class ScaledBackoffOpenAI(openai.AsyncOpenAI):
            """The SDK's back-off (0.5 s x 2^n, jittered) in simulated time; retry-after is already scaled."""

            def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):  # type: ignore[no-untyped-def]
                wait = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
                if self._parse_retry_after_header(response_headers) is not None:
                    return wait
                return wait * time_scale

        self.workflow, self.concurrency = workflow, concurrency
        self.client = ScaledBackoffOpenAI(base_url=root + "/v1", api_key="bench", max_retries=2, timeout=call_timeout_s)

    async def _call(self, step: StepSpec, system: str | None, prompt: str) -> tuple[str, str | None, str]:
        choice = step.models[0]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        params = {"temperature": choice.temperature} if choice.temperature is not None else {}
        resp = await self.client.chat.completions.create(
            model=choice.model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=choice.max_tokens,
            **params,
        )
        c = resp.choices[0]
        return c.message.content or "", c.finish_reason, "openai"

    async def _run(self, records: list[tuple[str, dict[str, Any]]]) -> list[RunResult]:
        return await run_all(records, self.concurrency, lambda record: run_dag(self.workflow, record, self._call))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        super().close()


# ---- (d) LiteLLM's Router, configured as its docs recommend ----------------------------------------------


class LiteLLMRouter(Contender):
    def __init__(
        self, root: str, workflow: WorkflowSpec, concurrency: int, call_timeout_s: float, time_scale: float
    ) -> None:
        super().__init__()
        # LiteLLM reads its retry back-off constants from the environment at import.
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        os.environ["INITIAL_RETRY_DELAY"] = str(0.5 * time_scale)
        os.environ["MAX_RETRY_DELAY"] = str(8.0 * time_scale)
        os.environ["JITTER"] = str(0.75 * time_scale)
        import litellm
        from litellm import Router

        litellm.suppress_debug_info = True
        ladder = workflow.steps[0].models
        model_list = []
        for choice in ladder:
            api_base = root + "/v1" if choice.provider == "openai" else root
            model_list.append(
                {
                    "model_name": choice.model,
                    "litellm_params": {
                        "model": f"{choice.provider}/{choice.model}",
                        "api_base": api_base,
                        "api_key": "bench",
                        "timeout": call_timeout_s,
                    },
                }
            )
        self.router = Router(
            model_list=model_list,
            num_retries=2,  # the docs' example
            timeout=call_timeout_s,
            fallbacks=[{ladder[0].model: [c.model for c in ladder[1:]]}],
            cooldown_time=5.0 * time_scale,  # the default cool-down, in simulated time
        )
        self.workflow, self.concurrency = workflow, concurrency

    async def _call(self, step: StepSpec, system: str | None, prompt: str) -> tuple[str, str | None, str]:
        choice = step.models[0]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        params = {"temperature": choice.temperature} if choice.temperature is not None else {}
        resp = await self.router.acompletion(
            model=choice.model, messages=messages, max_tokens=choice.max_tokens, **params
        )
        c = resp.choices[0]
        return c.message.content or "", c.finish_reason, "openai"  # LiteLLM speaks OpenAI's vocabulary

    async def _run(self, records: list[tuple[str, dict[str, Any]]]) -> list[RunResult]:
        return await run_all(records, self.concurrency, lambda record: run_dag(self.workflow, record, self._call))


# ---- (b) and (c) tailrace, hedging off and on ------------------------------------------------------------


class Tailrace(Contender):
    """`run_batch` per chunk; the executors' latency windows carry over through a named stats actor."""

    def __init__(
        self,
        root: str,
        workflow: WorkflowSpec,
        concurrency: int,
        scale: float,
        hedging: bool,
        name: str,
        hedge: HedgeConfig | None = None,
    ) -> None:
        from tailrace.policies.hedging import TailTuning, scaled_hedge

        super().__init__()
        self.root, self.workflow, self.concurrency = root, workflow, concurrency
        base = (hedge or HedgeConfig()).model_copy(update={"enabled": hedging})
        self.hedge = scaled_hedge(base, scale)
        self.tuning = TailTuning().scaled(scale)
        self.stats_name = name
        self.deadline_s = math.inf

    def run(self, records: list[tuple[str, dict[str, Any]]]) -> list[RunResult]:
        from tailrace.cluster.api import run_batch
        from tailrace.cluster.providers import SimulatorEndpoints

        results: list[RunResult] = []

        def done(o: Any) -> None:
            results.append(
                RunResult(
                    o.run_id,
                    o.delivered,
                    o.latency_s,
                    bool(o.degraded_steps),
                    None if o.delivered else (o.failure.value if o.failure else "?"),
                )
            )

        from tailrace.cluster.pool import NoExecutorError

        options = RunOptions(**{**self.workflow.defaults.model_dump(), "deadline_s": self.deadline_s})
        for attempt in range(3):
            try:
                run_batch(
                    self.workflow,
                    (r for _, r in records),
                    options=options,
                    max_in_flight=self.concurrency,
                    simulator=SimulatorEndpoints(self.root + "/v1", self.root),
                    on_done=done,
                    hedge=self.hedge,
                    tuning=self.tuning,
                    stats_name=self.stats_name,
                )
                return results
            except NoExecutorError:
                # On a heavily loaded machine the previous contender's executors can take more than a
                # minute to release their CPUs; no run of this chunk has started yet, so start it again.
                if attempt == 2 or results:
                    raise
                time.sleep(10)
        return results

    def close(self) -> None:
        import ray

        from tailrace.actors.latency_stats import NAMESPACE

        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(self.stats_name, namespace=NAMESPACE))
        super().close()
