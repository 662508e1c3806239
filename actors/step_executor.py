"""The step executor actor: an async Ray actor that runs steps' attempts with a `StepRunner`.

Many steps run concurrently in one executor (asyncio); health and admin calls have their own
concurrency group so a busy executor still answers them.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import ray

from actors.spend import RunCostGate, SpendGate
from actors.step_runner import StepRequest, StepRunner
from engine.clock import SYSTEM_CLOCK
from engine.outcomes import StepResult
from engine.providers.base import AdapterSettings, ProviderAdapter, build_adapter


@ray.remote(concurrency_groups={"admin": 1}, max_restarts=-1, max_task_retries=0)
class StepExecutor:
    def __init__(self, providers: Mapping[str, AdapterSettings], name: str = "executor",
                 budget: Any = None) -> None:
        self._name = name
        self._adapters: dict[str, ProviderAdapter] = {
            provider: build_adapter(settings, SYSTEM_CLOCK) for provider, settings in providers.items()
        }
        # With a cluster budget (an `actors.budget_actor.BudgetHandle`), every attempt also reserves
        # from this executor's lease, after the run's cost cap.
        self._budget = None if budget is None else budget.executor_gate(f"{name}-{os.getpid()}")
        self._runner = StepRunner(self._adapters, gate_factory=self._gate if self._budget is not None else None)
        self._stops: dict[str, asyncio.Event] = {}   # run id -> stop signal for its steps here
        self._steps_per_run: Counter[str] = Counter()
        self._in_flight = 0

    def _gate(self, request: StepRequest) -> SpendGate:
        from actors.direct_gate import ComposedGate

        assert self._budget is not None
        return ComposedGate([RunCostGate(request.cost_remaining_usd), self._budget.gate()])

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
                "in_flight": self._in_flight,
                **({"budget": self._budget.snapshot()} if self._budget is not None else {})}

    async def shutdown(self) -> None:
        if self._budget is not None:
            await self._budget.aclose()   # return the lease and report the last spend
        await asyncio.gather(*(a.aclose() for a in self._adapters.values()), return_exceptions=True)
