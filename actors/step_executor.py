"""The step executor actor: an async Ray actor that runs steps' attempts with a `StepRunner`.

Many steps run concurrently in one executor (asyncio); health and admin calls have their own
concurrency group so a busy executor still answers them. Steps are hedged by default (see
`tailrace.runtime.tail_control`); `hedge=HedgeConfig(enabled=False)` runs the same policy without duplicates.
With `stats_name`, the executor shares its latency windows with the others through that stats actor.

Start-up never fails on the user's setup: the user code the driver shipped (`shipped`, see
`tailrace.actors.user_code`) is installed and a provider without a key on this node is noted, and
`preflight` reports both, with this executor's name and node, before the driver starts a run.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import ray

from tailrace.actors import user_code
from tailrace.actors.attempt_journal import JournalingObserver, JournalReporter
from tailrace.actors.latency_stats import StatsSync
from tailrace.engine.clock import SYSTEM_CLOCK, Clock
from tailrace.engine.errors import TailraceError
from tailrace.engine.outcomes import CancelReason, FailureReason, StepResult
from tailrace.engine.providers.base import AdapterSettings, ProviderAdapter, build_adapter
from tailrace.engine.specs import HedgeConfig
from tailrace.engine.user_code import CodeRef
from tailrace.policies.hedging import TailTuning
from tailrace.policies.spend import RunCostGate, SpendGate
from tailrace.runtime.step_runner import RunStop, StepRequest, StepRunner
from tailrace.runtime.tail_control import TailControl


@ray.remote(concurrency_groups={"admin": 1}, max_restarts=-1, max_task_retries=0)
class StepExecutor:
    def __init__(
        self,
        providers: Mapping[str, AdapterSettings],
        name: str = "executor",
        clock: Clock | None = None,
        hedge: HedgeConfig | None = None,
        tuning: TailTuning | None = None,
        stats_name: str | None = None,
        budget: Any = None,
        journal_name: str | None = None,
        shipped: Mapping[str, bytes] | None = None,
    ) -> None:
        # `clock` is this process's view of time; tests inject a skewed one to play a node whose
        # wall clock is off (the deadline each step gets is converted with it, once, on arrival).
        clock = clock or SYSTEM_CLOCK
        self._name = name
        self._code_problems = user_code.install(shipped or {})
        self._adapters: dict[str, ProviderAdapter] = {}
        self._provider_problems: dict[str, str] = {}
        for provider, settings in providers.items():
            try:
                self._adapters[provider] = build_adapter(settings, clock)
            except TailraceError as exc:  # e.g. no API key in this node's environment
                self._provider_problems[provider] = str(exc)
        self.tail = TailControl(hedge, tuning, clock)
        # With a cluster budget (an `tailrace.actors.budget_actor.BudgetHandle`), every attempt also reserves
        # from this executor's lease, after the run's cost cap.
        self._budget = None if budget is None else budget.executor_gate(f"{name}-{os.getpid()}")
        # With a journal (one per batch), attempts are reported as they start and end, so an executor's
        # death loses no attempt record (`tailrace.actors.attempt_journal`).
        self._journal = None if journal_name is None else JournalReporter(journal_name, clock)
        self._runner = StepRunner(
            self._adapters,
            clock=clock,
            policy_factory=self.tail.policy_for,
            observer=self.tail if self._journal is None else JournalingObserver(self.tail, self._journal),
            gate_factory=self._gate if self._budget is not None else None,
        )
        self._sync: StatsSync | None = None
        if stats_name is not None:
            source = f"{name}-{os.getpid()}-{id(self):x}"
            self._sync = StatsSync(self.tail.stats, stats_name, source, self.tail.tuning.sync_interval_s)
        self._clock = clock
        self._stops: dict[str, RunStop] = {}  # run id -> stop signal for its steps here
        self._steps_per_run: Counter[str] = Counter()
        self._in_flight = 0
        self._served = 0

    def _gate(self, request: StepRequest) -> SpendGate:
        from tailrace.runtime.direct_gate import ComposedGate

        assert self._budget is not None
        # A step with upstream outputs belongs to a run under way: its attempts go before runs' first steps.
        return ComposedGate([RunCostGate(request.cost_remaining_usd), self._budget.gate(bool(request.upstream))])

    async def run_step(self, request: StepRequest) -> StepResult:
        if self._sync is not None:
            self._sync.start()  # in this actor's event loop; the first sync warms the windows
        if self._journal is not None:
            self._journal.start()
        self._served += 1
        unusable = [m.provider for m in request.step.models if m.provider in self._provider_problems]
        if unusable:  # an executor that joined after the driver's preflight, on a node without the key
            problem = self._provider_problems[unusable[0]]
            return StepResult(
                step_id=request.step.id,
                ok=False,
                failure=FailureReason.CONFIGURATION_ERROR,
                detail=f"step {request.step.id!r}: {problem} (executor {self._name} on node {_node()})",
            )
        run_id = request.run_id
        stop = self._stops.setdefault(run_id, RunStop())
        self._steps_per_run[run_id] += 1
        self._in_flight += 1
        try:
            return await self._runner.run(request, stop)
        finally:
            if self._journal is not None:
                self._journal.step_done(run_id, request.step.id)
            self._in_flight -= 1
            self._steps_per_run[run_id] -= 1
            if self._steps_per_run[run_id] <= 0:
                del self._steps_per_run[run_id]
                self._stops.pop(run_id, None)

    async def cancel_run(self, run_id: str, reason: CancelReason = CancelReason.RUN_FAILED) -> None:
        """Stop every step of `run_id` running here; each returns with its attempts cancelled for `reason`."""
        stop = self._stops.get(run_id)
        if stop is not None:
            stop.set(CancelReason(reason))

    async def preflight(
        self, refs: list[CodeRef], providers: list[str], shipped: Mapping[str, bytes] | None = None
    ) -> list[dict[str, str]]:
        """What this executor cannot use of a workflow: its user code (`refs`, after installing what the
        driver ships with it) and its providers. Empty when the workflow can run here."""
        if shipped:
            self._code_problems.update(user_code.install(shipped))
        where = {"executor": self._name, "node": _node(), "ip": ray.util.get_node_ip_address()}
        problems = [
            {"field": ref.field, "kind": ref.kind, "name": ref.name, "problem": problem, **where}
            for ref, problem in user_code.check(refs, self._code_problems)
        ]
        problems += [
            {"field": f"providers.{p}", "kind": "provider", "name": p, "problem": self._provider_problems[p], **where}
            for p in providers
            if p in self._provider_problems
        ]
        return problems

    @ray.method(concurrency_group="admin")
    async def health(self) -> dict[str, object]:
        return {
            "name": self._name,
            "pid": os.getpid(),
            "node": _node(),
            "served": self._served,
            "in_flight": self._in_flight,
            "attempts_in_flight": self._runner.attempts_in_flight,
            **({"budget": self._budget.snapshot()} if self._budget is not None else {}),
        }

    async def tail_snapshot(self) -> dict[str, object]:
        """What tail control sees now: sample counts, circuit states, retry tokens, syncs done."""
        now = self._clock.monotonic()
        counts = {key: self.tail.stats.count(key) for key in self.tail.stats.snapshot()}
        return {
            "samples": counts,
            "circuits": {k: v.value for k, v in self.tail.breakers.states(now).items()},
            "retry_tokens": {k: self.tail.throttle.tokens(k) for k in counts},
            "syncs": 0 if self._sync is None else self._sync.syncs,
        }

    async def sync_stats(self) -> None:
        """Sync latency windows with the shared stats actor now (also done in the background)."""
        if self._sync is not None:
            self._sync.start()
            await self._sync.sync_once()

    async def shutdown(self) -> None:
        if self._sync is not None:
            await self._sync.stop()
        if self._journal is not None:
            await self._journal.stop()
        if self._budget is not None:
            await self._budget.aclose()  # return the lease and report the last spend
        await asyncio.gather(*(a.aclose() for a in self._adapters.values()), return_exceptions=True)


def _node() -> str:
    return ray.get_runtime_context().get_node_id()
