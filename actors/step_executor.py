"""The step executor actor: an async Ray actor that runs steps' attempts with a `StepRunner`.

Many steps run concurrently in one executor (asyncio); health and admin calls have their own
concurrency group so a busy executor still answers them.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Mapping

import ray

from actors.step_runner import StepRequest, StepRunner
from engine.clock import SYSTEM_CLOCK, Clock
from engine.outcomes import StepResult
from engine.providers.base import AdapterSettings, ProviderAdapter, build_adapter


@ray.remote(concurrency_groups={"admin": 1}, max_restarts=-1, max_task_retries=0)
class StepExecutor:
    def __init__(self, providers: Mapping[str, AdapterSettings], name: str = "executor",
                 clock: Clock | None = None) -> None:
        # `clock` is this process's view of time; tests inject a skewed one to play a node whose
        # wall clock is off (the deadline each step gets is converted with it, once, on arrival).
        clock = clock or SYSTEM_CLOCK
        self._name = name
        self._adapters: dict[str, ProviderAdapter] = {
            provider: build_adapter(settings, clock) for provider, settings in providers.items()
        }
        self._runner = StepRunner(self._adapters, clock=clock)
        self._stops: dict[str, asyncio.Event] = {}   # run id -> stop signal for its steps here
        self._steps_per_run: Counter[str] = Counter()
        self._in_flight = 0

    async def run_step(self, request: StepRequest) -> StepResult:
        run_id = request.run_id
        stop = self._stops.setdefault(run_id, asyncio.Event())
        self._steps_per_run[run_id] += 1
        self._in_flight += 1
        try:
            return await self._runner.run(request, stop)
        finally:
            self._in_flight -= 1
            self._steps_per_run[run_id] -= 1
            if self._steps_per_run[run_id] <= 0:
                del self._steps_per_run[run_id]
                self._stops.pop(run_id, None)

    async def cancel_run(self, run_id: str) -> None:
        """Stop every step of `run_id` running here; each returns `cancelled` with its attempts."""
        stop = self._stops.get(run_id)
        if stop is not None:
            stop.set()

    @ray.method(concurrency_group="admin")
    async def health(self) -> dict[str, object]:
        return {"name": self._name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "in_flight": self._in_flight, "attempts_in_flight": self._runner.attempts_in_flight}

    async def shutdown(self) -> None:
        await asyncio.gather(*(a.aclose() for a in self._adapters.values()), return_exceptions=True)
