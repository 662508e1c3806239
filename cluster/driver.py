"""The driver: runs a batch of input records through a workflow on Ray executors, one absolute
deadline per run.

Each run's DAG is orchestrated here (deterministic: ready steps start in declaration order). The
deadline is set once when the run starts and travels with every step request; executors end their
steps at it on their own, and the driver backstops with `grace_s` so no run outlives its deadline by
more than that, whatever happens to an executor.

Each step request also carries the step's share of the remaining time (its weight over the remaining
critical path, `tailrace.policies.allocation`), so the step picks a model that leaves its successors their
time, and its share of the run's allowance for duplicates and retries (with a `hedge` config).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError, TaskCancelledError

from tailrace.actors.attempt_journal import lost_attempts
from tailrace.cluster.pool import ExecutorSource, Lease, NoExecutorError
from tailrace.cluster.results import BatchSummary, ResultWriter
from tailrace.engine.clock import DEFAULT_GRACE_S, SYSTEM_CLOCK, Clock, Deadline, RunDeadline, wait_all, wait_first
from tailrace.engine.config_errors import step_configuration_error
from tailrace.engine.dag import Dag
from tailrace.engine.outcomes import AttemptRecord, CancelReason, FailureReason, RunOutcome, StepResult
from tailrace.engine.records import RejectedRecord
from tailrace.engine.specs import HedgeConfig, RunOptions, WorkflowSpec
from tailrace.policies.allocation import split_extra_tokens, step_extra_tokens, step_weights, time_shares
from tailrace.policies.hedging import effective_config
from tailrace.policies.spend_limits import attempt_weight, split_cost
from tailrace.runtime import run_metrics
from tailrace.runtime.step_runner import StepRequest


@dataclass
class _RunState:
    run_id: str
    inputs: dict[str, Any]
    deadline: RunDeadline  # set once: every step request carries this same deadline
    started_at: float  # wall clock, for the record
    started_mono: float  # latency is measured on the monotonic clock (immune to NTP steps)
    outputs: dict[str, Any] = field(default_factory=dict)
    attempts: list[AttemptRecord] = field(default_factory=list)
    degraded: dict[str, str] = field(default_factory=dict)
    cost_usd: float = 0.0
    promised_usd: dict[str, float] = field(default_factory=dict)  # running steps' shares of the cost cap
    failure: FailureReason | None = None
    detail: str | None = None
    failed_step: str | None = None
    extra_allowance: int | None = None  # tokens for duplicates and retries
    extra_spent: int = 0
    extra_held: dict[str, int] = field(default_factory=dict)  # running step -> its share
    # step -> attempts recorded for it from executors that died under it: the step's later attempts
    # (numbered from 0 again by the next executor) are numbered after them
    lost_attempts: dict[str, int] = field(default_factory=dict)

    def extra_grants(self, steps: list[str]) -> dict[str, int | None]:
        if self.extra_allowance is None:
            return dict.fromkeys(steps)
        free = self.extra_allowance - self.extra_spent - sum(self.extra_held.values())
        share = split_extra_tokens(free, len(steps))
        return dict.fromkeys(steps, share)


@dataclass
class _StepCall:
    """Where one step of one run is running now (it moves if its executor dies)."""

    step_id: str
    index: int | None = None
    executor: Any = None
    ref: Any = None


_Pending = dict[asyncio.Task[StepResult], _StepCall]
# A step stopped by its run, its budget or the driver: its attempts say nothing about the setup.
_NOT_THE_SETUP = frozenset({FailureReason.BUDGET_EXHAUSTED, FailureReason.CANCELLED})


class ExecutorChooser:
    """Least outstanding steps first; ties round-robin."""

    def __init__(self, executors: Sequence[Any]) -> None:
        self.executors = list(executors)
        self._load = [0] * len(self.executors)
        self._turn = itertools.count()

    def acquire(self, avoid: Any = None) -> int:
        # One turn per choice, the same for every candidate: the idle executor after the last one chosen wins.
        turn = next(self._turn) % len(self.executors)
        best = min(
            range(len(self.executors)),
            key=lambda i: (self.executors[i] is avoid, self._load[i], (i - turn) % len(self.executors)),
        )
        self._load[best] += 1
        return best

    def release(self, index: int) -> None:
        self._load[index] -= 1

    # The `ExecutorSource` interface, so a fixed list of executors and an `ExecutorPool` drive alike.
    async def lease(self, deadline: Deadline, avoid: Any = None) -> Lease:
        return Lease(self.executors[(index := self.acquire(avoid))], index)

    def give_back(self, lease: Lease) -> None:
        self.release(lease.key)

    def lost(self, lease: Lease) -> bool:
        return len(self.executors) >= 2


class RunAdmission(Protocol):
    """Asked once when a run starts; a refusal ends the run at once as `budget_exhausted`.
    An admission may also define `finished(run_id, outcome)`, called when an admitted run ends."""

    async def admit(
        self, run_id: str, workflow: WorkflowSpec, options: RunOptions, deadline: RunDeadline
    ) -> str | None:
        """None to admit the run, else the reason it cannot be served before its deadline."""
        ...


class WorkflowDriver:
    def __init__(
        self,
        workflow: WorkflowSpec,
        options: RunOptions,
        executors: Sequence[Any] | ExecutorSource,
        clock: Clock = SYSTEM_CLOCK,
        grace_s: float = DEFAULT_GRACE_S,
        admission: RunAdmission | None = None,
        hedge: HedgeConfig | None = None,
        journal: Any = None,
    ) -> None:
        self.admission = admission
        # The batch's attempt journal (`tailrace.actors.attempt_journal`): where the attempts of a step
        # whose executor died are found, so they are recorded (`executor_lost`) and paid for.
        self.journal = journal
        self.workflow = workflow
        self.options = options
        self.dag = Dag.from_spec(workflow)
        # A fixed list of executors, or a pool that grows, shrinks and replaces them (cluster.pool).
        self.pool: ExecutorSource = executors if hasattr(executors, "lease") else ExecutorChooser(executors)
        self.hedge = hedge
        self.time_shares = time_shares(self.dag, step_weights(workflow))
        self.clock = clock
        self.grace_s = grace_s

    async def run(
        self, run_id: str, inputs: dict[str, Any] | RejectedRecord, deadline: RunDeadline | None = None
    ) -> RunOutcome:
        """Run one record to its outcome by its deadline: `options.deadline_s` from now, or `deadline`
        (e.g. one an online caller derived from its own client's deadline; bound here to this clock).
        A record that cannot be a run (`RejectedRecord`) ends at once, typed `invalid_input`."""
        started_mono = self.clock.monotonic()
        if deadline is None:
            deadline = RunDeadline.start(self.options.deadline_s, self.clock, grace_s=self.grace_s)
            started_at = deadline.epoch_s - self.options.deadline_s
        else:
            if deadline.at is None or deadline.clock is not self.clock:
                deadline = deadline.arrive(self.clock)
            started_at = self.clock.time()
        rejected = inputs if isinstance(inputs, RejectedRecord) else None
        inputs = {} if rejected is not None else inputs
        state = _RunState(
            run_id,
            inputs,
            deadline,
            started_at,
            started_mono,
            extra_allowance=None if rejected is not None else self._extra_allowance(inputs),
        )
        if rejected is not None:  # a record that cannot be a run ends here, typed; the batch goes on
            state.failure, state.detail = FailureReason.INVALID_INPUT, rejected.problem
            return self._outcome(state)
        pending: _Pending = {}
        started: set[str] = set()
        if self.admission is not None:
            refusal = await self.admission.admit(run_id, self.workflow, self.options, state.deadline)
            if refusal is not None:
                state.failure, state.detail = FailureReason.BUDGET_EXHAUSTED, refusal
                return self._outcome(state)
        try:
            while len(state.outputs) < len(self.workflow.steps) and state.failure is None:
                ready = self.dag.ready(set(state.outputs), started)
                shares = self._cost_shares(state, ready)
                for step_id, grant in state.extra_grants(ready).items():
                    if grant is not None:
                        state.extra_held[step_id] = grant
                    started.add(step_id)
                    call = _StepCall(step_id)
                    pending[asyncio.ensure_future(self._run_step(state, call, shares.get(step_id)))] = call
                # The backstop fires halfway into the grace, leaving the rest to collect the stragglers' records.
                done = await wait_first(pending, state.deadline.backstop)
                if not done:
                    state.failure, state.detail = FailureReason.DEADLINE_EXCEEDED, "run deadline reached"
                    break
                for task in done:
                    self._absorb(state, pending.pop(task).step_id, task)
        finally:
            await self._stop_pending(state, pending)
        outcome = self._outcome(state)
        finished = getattr(self.admission, "finished", None)
        if finished is not None:
            finished(run_id, outcome)
        return outcome

    def _extra_allowance(self, inputs: dict[str, Any]) -> int | None:
        """The run's tokens for duplicates and retries: each step's fraction of its expected tokens."""
        if self.hedge is None or not self.hedge.enabled:
            return None
        total = 0
        for step in self.workflow.steps:
            config = effective_config(self.hedge, step.hedge)
            total += step_extra_tokens(step, inputs, config.extra_token_fraction)
        return total

    def _cost_shares(self, state: _RunState, ready: Sequence[str]) -> dict[str, float]:
        """Steps starting together split what is left of the run's cost cap (less what running steps
        hold), so together they cannot spend more than the cap; a step alone gets all that is left."""
        if self.options.max_cost_usd is None or not ready:
            return {}
        unpromised = self.options.max_cost_usd - state.cost_usd - sum(state.promised_usd.values())
        shares = split_cost(max(0.0, unpromised), {s: attempt_weight(self.workflow.step(s)) for s in ready})
        state.promised_usd.update(shares)
        return shares

    async def _run_step(self, state: _RunState, call: _StepCall, cost_share: float | None = None) -> StepResult:
        step = self.workflow.step(call.step_id)
        avoid = None
        while True:
            remaining_cost = None
            if self.options.max_cost_usd is not None:
                remaining_cost = max(0.0, self.options.max_cost_usd - state.cost_usd)
                if cost_share is not None:
                    remaining_cost = min(remaining_cost, cost_share)
            request = StepRequest(
                run_id=state.run_id,
                workflow=self.workflow.name,
                tenant=self.options.tenant,
                step=step,
                inputs=state.inputs,
                upstream={d: state.outputs[d] for d in self.dag.ancestors(step.id)},
                deadline=state.deadline,
                cost_remaining_usd=remaining_cost,
                max_attempts=self.options.max_attempts_per_step,
                time_share=self.time_shares[step.id],
                extra_tokens=state.extra_held.get(step.id),
            )
            lease = await self.pool.lease(state.deadline.deadline, avoid)
            call.index, call.executor = lease.key, lease.executor
            call.ref = call.executor.run_step.remote(request)
            try:
                return await call.ref
            except RayActorError:
                # The executor died with the step in flight: record what it had started, then run the
                # step again elsewhere while time remains.
                await self._record_lost_attempts(state, step.id)
                if not self.pool.lost(lease) or state.deadline.remaining() <= 0:
                    raise
                avoid = call.executor
            finally:
                self.pool.give_back(lease)
                call.index = None

    async def _record_lost_attempts(self, state: _RunState, step_id: str) -> None:
        if self.journal is None:
            return
        # Bounded by the backstop, as every wait of a run is: past its deadline the records still count.
        lost = await lost_attempts(self.journal, state.run_id, step_id, self.clock.time(), state.deadline.backstop)
        if not lost:
            return
        offset = state.lost_attempts.get(step_id, 0)
        state.attempts.extend(a.model_copy(update={"attempt": a.attempt + offset}) for a in lost)
        state.cost_usd += sum(a.cost_usd for a in lost)
        state.lost_attempts[step_id] = offset + max(a.attempt for a in lost) + 1

    @staticmethod
    def _after_lost(state: _RunState, step_id: str, attempts: list[AttemptRecord]) -> list[AttemptRecord]:
        """A step's attempts, numbered after those recorded for it from executors that died."""
        offset = state.lost_attempts.get(step_id, 0)
        if not offset:
            return attempts
        return [a.model_copy(update={"attempt": a.attempt + offset}) for a in attempts]

    def _absorb(self, state: _RunState, step_id: str, task: asyncio.Task[StepResult]) -> None:
        try:
            result = task.result()
        except (RayActorError, RayTaskError, TaskCancelledError, RayError) as exc:  # e.g. a lost result object
            state.failure = FailureReason.PROVIDER_ERROR
            state.detail, state.failed_step = f"executor failed: {type(exc).__name__}", step_id
            return
        except NoExecutorError as exc:
            state.failure, state.detail, state.failed_step = FailureReason.DEADLINE_EXCEEDED, str(exc), step_id
            return
        state.attempts.extend(self._after_lost(state, step_id, result.attempts))
        state.cost_usd += sum(a.cost_usd for a in result.attempts)
        state.extra_held.pop(step_id, None)
        state.extra_spent += sum(a.input_tokens + a.output_tokens for a in result.attempts if a.role != "primary")
        state.promised_usd.pop(step_id, None)
        if result.ok:
            state.outputs[step_id] = result.output
            if result.tier:
                state.degraded[step_id] = result.model or ""
        elif state.failure is None:
            state.failure, state.detail, state.failed_step = result.failure, result.detail, step_id
            misconfigured = step_configuration_error(step_id, result.attempts)
            if misconfigured is not None and result.failure not in _NOT_THE_SETUP:
                state.failure, state.detail = FailureReason.CONFIGURATION_ERROR, misconfigured

    async def _stop_pending(self, state: _RunState, pending: _Pending) -> None:
        """Cancel the run's outstanding steps and keep the attempt records that come back while the
        run's grace lasts; never wait past deadline + grace."""
        if not pending:
            return
        if state.failed_step is None:
            state.failed_step = next(iter(pending.values())).step_id  # still running when the deadline hit
        # Past the deadline it is the deadline that stops them; before it, the run failed elsewhere.
        reason = CancelReason.DEADLINE if state.deadline.expired() else CancelReason.RUN_FAILED
        for call in pending.values():
            if call.executor is not None:
                call.executor.cancel_run.remote(state.run_id, reason)
        done = await wait_all(pending, state.deadline.collect.earlier(state.deadline.grace_s))
        for task in set(pending) - done:
            ref = pending[task].ref
            if isinstance(ref, ray.ObjectRef):
                ray.cancel(ref)
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is None:
                result = task.result()
                state.attempts.extend(self._after_lost(state, pending[task].step_id, result.attempts))
                state.cost_usd += sum(a.cost_usd for a in result.attempts)

    def _outcome(self, state: _RunState) -> RunOutcome:
        latency = self.clock.monotonic() - state.started_mono
        ended = state.started_at + latency
        delivered = state.failure is None
        outcome = RunOutcome(
            run_id=state.run_id,
            workflow=self.workflow.name,
            tenant=self.options.tenant,
            delivered=delivered,
            failure=state.failure,
            detail=state.detail,
            failed_step=state.failed_step,
            outputs={s: state.outputs[s] for s in self.dag.sinks()} if delivered else {},
            started_at=state.started_at,
            ended_at=ended,
            deadline_at=state.deadline.epoch_s,
            latency_s=latency,
            cost_usd=state.cost_usd,
            input_tokens=sum(a.input_tokens for a in state.attempts),
            output_tokens=sum(a.output_tokens for a in state.attempts),
            degraded_steps=state.degraded,
            attempts=state.attempts,
        )
        run_metrics.run_finished(outcome)
        return outcome


async def run_records(
    driver: WorkflowDriver,
    records: Iterable[tuple[str, dict[str, Any] | RejectedRecord]],
    writer: ResultWriter,
    summary: BatchSummary,
    max_in_flight: int,
    on_done: Callable[[RunOutcome], None] | None = None,
) -> None:
    """Run records with at most `max_in_flight` runs at once; write each outcome as it finishes."""
    in_flight: set[asyncio.Task[RunOutcome]] = set()

    def finish(task: asyncio.Task[RunOutcome]) -> None:
        outcome = task.result()
        writer.write(outcome)
        summary.add(outcome)
        if on_done is not None:
            on_done(outcome)

    for run_id, record in records:
        if len(in_flight) >= max_in_flight:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                finish(task)
        in_flight.add(asyncio.ensure_future(driver.run(run_id, record)))
    while in_flight:
        done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            finish(task)
