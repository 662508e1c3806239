"""Replay a batch on fake time: the workflow's DAG through the real step runner, tail control, spend
gates and budget, against the sampled provider. No Ray, no sockets; thousands of runs a minute of CPU.

`Replay` plays what `run_batch` does, in one process:

* executors: `executors` pairs of the real `StepRunner` and `TailControl` (its latency windows,
  breakers, retry throttle), their windows exchanged every `tuning.sync_interval_s` as the shared
  stats actor does; steps go to the executor with the fewest in flight;
* the driver: one absolute `RunDeadline` per run, ready steps in declaration order, each with its
  time share, its part of the run's extra-token allowance and of its cost cap, the driver's backstop
  at the deadline plus half the grace, a failed run's other steps stopped -- as
  `tailrace.cluster.driver.WorkflowDriver` does (that module imports Ray, so the loop is written again
  here over the same policies; a change to one belongs in the other);
* the engine's own time: the gaps the trace recorded before a step's first attempt and after a run's
  last step (dispatch hops, the driver's loop), drawn from the trace;
* the cluster budget, when there is one: the real lease pools on an in-process ledger
  (`MemoryLedger`), and the run admission the caller hands in (the cluster's `BudgetAdmission`);
* arrivals: `concurrency` runs in flight, the next starting when one ends, as `run_batch` does; a
  trace written in parts (a resumed batch) is replayed in the same parts, with the same pauses
  between them (budgets refill, the providers' time stands still).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tailrace.engine.clock import FakeClock, RunDeadline, wait_all, wait_first
from tailrace.engine.dag import Dag
from tailrace.engine.outcomes import AttemptRecord, CancelReason, FailureReason, RunOutcome, StepResult
from tailrace.engine.specs import HedgeConfig, RunOptions, WorkflowSpec
from tailrace.policies.allocation import split_extra_tokens, step_extra_tokens, step_weights, time_shares
from tailrace.policies.budget_config import BudgetConfig
from tailrace.policies.hedging import TailTuning, effective_config
from tailrace.policies.spend import RunCostGate, SpendGate
from tailrace.policies.spend_limits import attempt_weight, split_cost
from tailrace.runtime._budget_common import LocalLedgerClient
from tailrace.runtime.budget_ledger import MemoryLedger
from tailrace.runtime.direct_gate import ComposedGate
from tailrace.runtime.lease_gate import LeasePool
from tailrace.runtime.step_runner import RunStop, StepRequest, StepRunner
from tailrace.runtime.tail_control import TailControl
from tailrace.whatif.fit import TraceFit
from tailrace.whatif.sampled import CURRENT_STEP, SampledProvider, StepContext
from tailrace.whatif.virtual_time import run_on_fake_time


class Admission(Protocol):
    """The driver's run admission (`tailrace.cluster.budget.BudgetAdmission` has this shape)."""

    async def admit(
        self, run_id: str, workflow: WorkflowSpec, options: RunOptions, deadline: RunDeadline
    ) -> str | None: ...


AdmissionFactory = Callable[[BudgetConfig, WorkflowSpec, FakeClock], Admission]


@dataclass(frozen=True)
class ReplayPlan:
    """What to replay: the workflow (its ladders and per-step hedging as they will be), the run options,
    tail control, budget and load."""

    workflow: WorkflowSpec
    options: RunOptions
    hedge: HedgeConfig
    tuning: TailTuning
    budget: BudgetConfig | None
    executors: int
    concurrency: int
    grace_s: float


@dataclass(frozen=True)
class Part:
    """Runs replayed as one batch, after a pause (a trace resumed later, or run in parts, has several)."""

    records: Sequence[tuple[str, Mapping[str, Any]]]
    pause_s: float = 0.0


class _Executor:
    """A step executor without the actor: the runner and tail control, and the run stops, as
    `tailrace.actors.step_executor.StepExecutor` holds them."""

    def __init__(
        self, plan: ReplayPlan, provider: SampledProvider, clock: FakeClock, lease_pool: LeasePool | None
    ) -> None:
        self.tail = TailControl(plan.hedge, plan.tuning, clock)
        self.lease_pool = lease_pool
        adapters = {name: provider.adapter(spec.kind) for name, spec in plan.workflow.all_providers().items()}
        self.runner = StepRunner(
            adapters,
            clock=clock,
            policy_factory=self.tail.policy_for,
            observer=self.tail,
            gate_factory=self._gate if lease_pool is not None else None,
        )
        self.in_flight = 0
        self._stops: dict[str, RunStop] = {}
        self._steps_per_run: dict[str, int] = {}

    def _gate(self, request: StepRequest) -> SpendGate:
        assert self.lease_pool is not None
        return ComposedGate([RunCostGate(request.cost_remaining_usd), self.lease_pool.gate()])

    async def run_step(self, request: StepRequest) -> StepResult:
        run_id = request.run_id
        stop = self._stops.setdefault(run_id, RunStop())
        self._steps_per_run[run_id] = self._steps_per_run.get(run_id, 0) + 1
        self.in_flight += 1
        try:
            return await self.runner.run(request, stop)
        finally:
            self.in_flight -= 1
            self._steps_per_run[run_id] -= 1
            if self._steps_per_run[run_id] <= 0:
                del self._steps_per_run[run_id]
                self._stops.pop(run_id, None)

    def cancel_run(self, run_id: str, reason: CancelReason) -> None:
        stop = self._stops.get(run_id)
        if stop is not None:
            stop.set(reason)


@dataclass
class _Run:
    run_id: str
    inputs: dict[str, Any]
    deadline: RunDeadline
    started_at: float
    started_mono: float
    outputs: dict[str, Any] = field(default_factory=dict)
    attempts: list[AttemptRecord] = field(default_factory=list)
    degraded: dict[str, str] = field(default_factory=dict)
    cost_usd: float = 0.0
    promised_usd: dict[str, float] = field(default_factory=dict)
    failure: FailureReason | None = None
    detail: str | None = None
    failed_step: str | None = None
    extra_allowance: int | None = None
    extra_spent: int = 0
    extra_held: dict[str, int] = field(default_factory=dict)
    executors: dict[str, _Executor] = field(default_factory=dict)  # step -> where it runs


class Replay:
    def __init__(
        self,
        fit: TraceFit,
        plan: ReplayPlan,
        records: Sequence[tuple[str, Mapping[str, Any]]] | Sequence[Part],
        *,
        seed: int = 0,
        admission: AdmissionFactory | None = None,
        max_chunks: int = 20,
    ) -> None:
        self.fit = fit
        self.plan = plan
        parts = list(records)
        self.parts: list[Part] = parts if parts and isinstance(parts[0], Part) else [Part(parts)]  # type: ignore[list-item]
        self.seed = seed
        self.clock = FakeClock()
        self.provider = SampledProvider(fit, self.clock, seed, max_chunks=max_chunks)
        self._rng = random.Random(seed ^ 0xD15C)
        self._admission_factory = admission
        self.dag = Dag.from_spec(plan.workflow)
        self.time_shares = time_shares(self.dag, step_weights(plan.workflow))
        self.outcomes: list[RunOutcome] = []

    def run(self) -> list[RunOutcome]:
        """Play every record; the outcomes in the order runs ended."""
        return run_on_fake_time(self._main(), self.clock)

    # ---- the batch ----------------------------------------------------------------------------------

    async def _main(self) -> list[RunOutcome]:
        plan = self.plan
        pools: list[LeasePool | None] = [None] * plan.executors
        self.admission: Admission | None = None
        self._new_admission: Callable[[], Admission] | None = None
        if plan.budget is not None:
            config = plan.budget.for_workflow(plan.workflow)
            ledger = MemoryLedger(config.bucket)
            pools = [
                LeasePool(config, LocalLedgerClient(ledger, self.clock), f"replay-{i}", self.clock)
                for i in range(plan.executors)
            ]
            if config.admission and self._admission_factory is not None:
                self._new_admission = lambda: self._admission_factory(config, plan.workflow, self.clock)  # type: ignore[misc]
        self.executors = [_Executor(plan, self.provider, self.clock, pool) for pool in pools]
        sync = asyncio.ensure_future(self._share_windows())
        self.provider.start()
        try:
            await self._arrivals()
        finally:
            sync.cancel()
            for pool in pools:
                if pool is not None:
                    await pool.aclose()
        return self.outcomes

    async def _arrivals(self) -> None:
        for part in self.parts:
            if part.pause_s > 0:
                await self.clock.sleep(part.pause_s)
                self.provider.pause(part.pause_s)
            # Each part of a batch is a `run_batch` of its own, with an admission of its own.
            self.admission = self._new_admission() if self._new_admission is not None else None
            in_flight: set[asyncio.Task[RunOutcome]] = set()
            for run_id, record in part.records:
                if len(in_flight) >= self.plan.concurrency:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    self._finished(done)
                in_flight.add(asyncio.ensure_future(self._run(run_id, dict(record))))
            while in_flight:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                self._finished(done)

    def _finished(self, done: set[asyncio.Task[RunOutcome]]) -> None:
        for task in done:
            outcome = task.result()
            self.outcomes.append(outcome)
            self.provider.answers.forget(outcome.run_id)
            finished = getattr(self.admission, "finished", None)
            if finished is not None:
                finished(outcome.run_id, outcome)

    async def _share_windows(self) -> None:
        """Every executor's new latency samples to every other, as the shared stats actor relays them."""
        if len(self.executors) < 2:
            return
        while True:
            await self.clock.sleep(self.plan.tuning.sync_interval_s)
            news = [e.tail.stats.take_new() for e in self.executors]
            for i, executor in enumerate(self.executors):
                for j, new in enumerate(news):
                    if i != j and new:
                        executor.tail.stats.merge(new)

    def _executor(self, avoid: _Executor | None = None) -> _Executor:
        return min(self.executors, key=lambda e: (e is avoid, e.in_flight))

    # ---- one run (as WorkflowDriver.run) ------------------------------------------------------------

    async def _run(self, run_id: str, inputs: dict[str, Any]) -> RunOutcome:
        plan, clock = self.plan, self.clock
        started_mono = clock.monotonic()
        deadline = RunDeadline.start(plan.options.deadline_s, clock, grace_s=plan.grace_s)
        run = _Run(
            run_id,
            inputs,
            deadline,
            deadline.epoch_s - plan.options.deadline_s,
            started_mono,
            extra_allowance=self._extra_allowance(inputs),
        )
        if self.admission is not None:
            refusal = await self.admission.admit(run_id, plan.workflow, plan.options, deadline)
            if refusal is not None:
                run.failure, run.detail = FailureReason.BUDGET_EXHAUSTED, refusal
                return self._outcome(run)
        pending: dict[asyncio.Task[StepResult], str] = {}
        started: set[str] = set()
        try:
            while len(run.outputs) < len(plan.workflow.steps) and run.failure is None:
                ready = self.dag.ready(set(run.outputs), started)
                shares = self._cost_shares(run, ready)
                for step_id, grant in self._extra_grants(run, ready).items():
                    if grant is not None:
                        run.extra_held[step_id] = grant
                    started.add(step_id)
                    pending[asyncio.ensure_future(self._step(run, step_id, shares.get(step_id)))] = step_id
                done = await wait_first(pending, deadline.backstop)
                if not done:
                    run.failure, run.detail = FailureReason.DEADLINE_EXCEEDED, "run deadline reached"
                    break
                for task in done:
                    self._absorb(run, pending.pop(task), task.result())
        finally:
            await self._stop_pending(run, pending)
        await clock.sleep(self._rng.choice(self.fit.gaps.finish))
        return self._outcome(run)

    def _extra_allowance(self, inputs: Mapping[str, Any]) -> int | None:
        hedge = self.plan.hedge
        if not hedge.enabled:
            return None
        total = 0
        for step in self.plan.workflow.steps:
            total += step_extra_tokens(step, inputs, effective_config(hedge, step.hedge).extra_token_fraction)
        return total

    @staticmethod
    def _extra_grants(run: _Run, steps: list[str]) -> dict[str, int | None]:
        if run.extra_allowance is None:
            return dict.fromkeys(steps)
        free = run.extra_allowance - run.extra_spent - sum(run.extra_held.values())
        return dict.fromkeys(steps, split_extra_tokens(free, len(steps)))

    def _cost_shares(self, run: _Run, ready: Sequence[str]) -> dict[str, float]:
        cap = self.plan.options.max_cost_usd
        if cap is None or not ready:
            return {}
        unpromised = cap - run.cost_usd - sum(run.promised_usd.values())
        shares = split_cost(max(0.0, unpromised), {s: attempt_weight(self.plan.workflow.step(s)) for s in ready})
        run.promised_usd.update(shares)
        return shares

    async def _step(self, run: _Run, step_id: str, cost_share: float | None) -> StepResult:
        plan = self.plan
        step = plan.workflow.step(step_id)
        gaps = self.fit.gaps.between if step.depends_on else self.fit.gaps.first
        await self.clock.sleep(self._rng.choice(gaps))  # the hop to an executor, as the trace had it
        remaining_cost = None
        if plan.options.max_cost_usd is not None:
            remaining_cost = max(0.0, plan.options.max_cost_usd - run.cost_usd)
            if cost_share is not None:
                remaining_cost = min(remaining_cost, cost_share)
        # Every field comes from validated objects: built without validating again, the replay's hot path.
        request = StepRequest.model_construct(
            run_id=run.run_id,
            workflow=plan.workflow.name,
            tenant=plan.options.tenant,
            step=step,
            inputs=run.inputs,
            upstream={d: run.outputs[d] for d in self.dag.ancestors(step.id)},
            deadline=run.deadline,
            cost_remaining_usd=remaining_cost,
            max_attempts=plan.options.max_attempts_per_step,
            time_share=self.time_shares[step.id],
            extra_tokens=run.extra_held.get(step.id),
        )
        executor = self._executor()
        run.executors[step_id] = executor
        CURRENT_STEP.set(StepContext(run.run_id, step, run.inputs))  # this task's own context
        return await executor.run_step(request)

    def _absorb(self, run: _Run, step_id: str, result: StepResult) -> None:
        run.attempts.extend(result.attempts)
        run.cost_usd += sum(a.cost_usd for a in result.attempts)
        run.extra_held.pop(step_id, None)
        run.extra_spent += sum(a.input_tokens + a.output_tokens for a in result.attempts if a.role != "primary")
        run.promised_usd.pop(step_id, None)
        if result.ok:
            run.outputs[step_id] = result.output
            if result.tier:
                run.degraded[step_id] = result.model or ""
        elif run.failure is None:
            run.failure, run.detail, run.failed_step = result.failure, result.detail, step_id

    async def _stop_pending(self, run: _Run, pending: dict[asyncio.Task[StepResult], str]) -> None:
        if not pending:
            return
        if run.failed_step is None:
            run.failed_step = next(iter(pending.values()))
        reason = CancelReason.DEADLINE if run.deadline.expired() else CancelReason.RUN_FAILED
        for step_id in pending.values():
            executor = run.executors.get(step_id)
            if executor is not None:
                executor.cancel_run(run.run_id, reason)
        done = await wait_all(pending, run.deadline.collect.earlier(run.deadline.grace_s))
        for task in set(pending) - done:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is None:
                result = task.result()
                run.attempts.extend(result.attempts)
                run.cost_usd += sum(a.cost_usd for a in result.attempts)
        leftovers = [t for t in pending if not t.done()]
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)

    def _outcome(self, run: _Run) -> RunOutcome:
        latency = self.clock.monotonic() - run.started_mono
        delivered = run.failure is None
        return RunOutcome(
            run_id=run.run_id,
            workflow=self.plan.workflow.name,
            tenant=self.plan.options.tenant,
            delivered=delivered,
            failure=run.failure,
            detail=run.detail,
            failed_step=run.failed_step,
            outputs={},
            started_at=run.started_at,
            ended_at=run.started_at + latency,
            deadline_at=run.deadline.epoch_s,
            latency_s=latency,
            cost_usd=run.cost_usd,
            input_tokens=sum(a.input_tokens for a in run.attempts),
            output_tokens=sum(a.output_tokens for a in run.attempts),
            degraded_steps=run.degraded,
            attempts=run.attempts,
        )


__all__ = ["Admission", "AdmissionFactory", "Part", "Replay", "ReplayPlan"]
