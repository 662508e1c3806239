"""Runs one step's attempts inside one process: the race loop a step executor actor wraps.

Attempts are asyncio tasks raced here, not across actors (cancelling a loser costs ~0.1 ms and is
reliable). The loop asks an `AttemptPolicy` what to do next, starts attempts when it says so, and
stops at the first *valid* answer, at a give-up, or at the step's deadline, cancelling whatever is
still running with a recorded reason. Validation runs inside the attempt, before it can win.
No Ray here, so the loop is tested directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, InstanceOf

from tailrace.engine.clock import SYSTEM_CLOCK, Clock, Deadline, RunDeadline, wait_first
from tailrace.engine.errors import TailraceError
from tailrace.engine.outcomes import (
    AttemptOutcome,
    AttemptRecord,
    AttemptRequest,
    CancelReason,
    ErrorKind,
    FailureReason,
    StepResult,
)
from tailrace.engine.prompts import render_messages
from tailrace.engine.providers.base import AttemptProgress, ProviderAdapter, ProviderCall, RawAttempt
from tailrace.engine.specs import ModelChoice, StepSpec
from tailrace.engine.tokens import estimate_prompt_tokens, estimate_tokens
from tailrace.engine.validation import Verdict, validate
from tailrace.policies.attempts import AttemptFeedback, AttemptPolicy, AttemptState, Cancel, GiveUp, Start
from tailrace.policies.spend import Grant, Refusal, RunCostGate, SpendAsk, SpendGate, attempt_usage
from tailrace.runtime import run_metrics


class StepRequest(BaseModel):
    """Everything an executor needs to run one step of one run; travels between processes."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    workflow: str
    tenant: str
    step: StepSpec
    inputs: dict[str, Any]
    upstream: dict[str, Any]
    deadline: InstanceOf[RunDeadline]  # the run's one deadline; bound to the receiver's clock on arrival
    cost_remaining_usd: float | None = None
    max_attempts: int = 4
    # The fraction of the run's remaining time this step may plan to use (see policies.allocation);
    # None: all of it.
    time_share: float | None = None
    # This step's share of the run's allowance for duplicates and retries, in tokens; None: unlimited.
    extra_tokens: int | None = None

    @property
    def idempotency_key(self) -> str:
        # Stable across retries of the same step of the same run; a header value, so ASCII only.
        run_id = self.run_id if self.run_id.isascii() and self.run_id.isprintable() else quote(self.run_id, safe="")
        return f"tailrace-{run_id}-{self.step.id}"


PolicyFactory = Callable[[StepRequest], AttemptPolicy]


class RunStop:
    """Tells a run's steps in one executor to stop, and why: the run failed elsewhere (`run_failed`) or
    its deadline passed while the driver had no answer (`deadline`, the driver's backstop)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason = CancelReason.RUN_FAILED

    def set(self, reason: CancelReason = CancelReason.RUN_FAILED) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


class AttemptObserver(Protocol):
    """Hears every attempt start and end and every step result (the executor's statistics and metrics)."""

    def attempt_started(self, request: StepRequest, choice: ModelChoice, role: str) -> None: ...

    def attempt_ended(self, request: StepRequest, record: AttemptRecord) -> None: ...

    def step_ended(self, request: StepRequest, result: StepResult) -> None: ...


def rendered_prompt(request: StepRequest, choice: ModelChoice) -> tuple[str | None, str]:
    """The (system, prompt) one rung of the step sends: its own prompt variant or the step's."""
    return render_messages(request.step, choice, request.inputs, request.upstream)


def sequential_policy(request: StepRequest) -> AttemptPolicy:
    """The attempt policy with hedging off, on cold statistics (the spec's latency priors): one attempt
    at a time, each killed at its timeout and retried. Executors use `TailControl.policy_for`."""
    from tailrace.engine.specs import HedgeConfig
    from tailrace.policies.hedging import HedgingPolicy, TailState
    from tailrace.policies.latency import LatencyStats

    return HedgingPolicy(
        request.step.models,
        HedgeConfig(enabled=False),
        TailState(LatencyStats(None, SYSTEM_CLOCK)),
        step_id=request.step.id,
        side_effect=request.step.side_effect,
        max_attempts=request.max_attempts,
        time_share=request.time_share,
        on_content_policy=request.step.on_content_policy,
    )


@dataclass
class _Attempt:
    number: int
    tier: int
    role: str
    choice: ModelChoice
    started_at_epoch: float
    progress: AttemptProgress
    grant: Grant
    call: ProviderCall | None = None
    task: asyncio.Task[tuple[RawAttempt, Verdict | None]] | None = None
    record: AttemptRecord | None = None
    value: Any = None
    text: str | None = None

    def state(self) -> AttemptState:
        r = self.record
        return AttemptState(
            tier=self.tier,
            started_at=self.progress.started_mono,
            role=self.role,
            first_token_at=self.progress.first_token_mono,
            last_token_at=self.progress.last_token_mono,
            finished_at=None if r is None else self.progress.started_mono + r.latency_s,
            outcome=None if r is None else r.outcome,
            error=None if r is None else r.error,
            tokens=None if r is None else r.input_tokens + r.output_tokens,
            received_chars=self.progress.received_chars,
            cancel_reason=None if r is None else r.cancel_reason,
        )


@dataclass
class _StepRun:
    request: StepRequest
    deadline: Deadline
    gate: SpendGate
    stop: RunStop
    attempts: list[_Attempt] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    winner: int | None = None
    input_error: str | None = None  # the run's input cannot make this step's request (no request sent)


class StepRunner:
    def __init__(
        self,
        adapters: Mapping[str, ProviderAdapter],
        clock: Clock = SYSTEM_CLOCK,
        policy_factory: PolicyFactory = sequential_policy,
        gate_factory: Callable[[StepRequest], SpendGate] | None = None,
        observer: AttemptObserver | None = None,
    ) -> None:
        self._adapters = adapters
        self._clock = clock
        self._policy_factory = policy_factory
        self._gate_factory = gate_factory or (lambda req: RunCostGate(req.cost_remaining_usd))
        self.attempts_in_flight = 0  # across every step running here; the executor pool reads it
        self._observer = observer

    async def run(self, request: StepRequest, stop: RunStop | None = None) -> StepResult:
        """Run the step to a valid answer, a give-up or its deadline. Setting `stop` ends it early:
        running attempts are cancelled with the stop's reason, and the step ends `cancelled` (its run
        failed elsewhere) or `deadline_exceeded` (the driver's backstop: the run's deadline passed)."""
        # The one conversion of the run's deadline to this process's clock: time spent queueing on the
        # way here is already gone. Work ends the return margin before it, so the result travels back in time.
        arrived = self._clock.monotonic()
        deadline = request.deadline.arrive(self._clock).work_deadline
        state = _StepRun(request, deadline, self._gate_factory(request), stop or RunStop())
        result: StepResult | None = None
        try:
            result = await self._race(state, self._policy_factory(request))
            run_metrics.step_finished(
                request.workflow,
                request.step.id,
                result.ok,
                self._clock.monotonic() - arrived,
                result.attempts,
                state.winner,
            )
            return result
        finally:
            # Cancelled from outside (driver gave up, shutdown): close every HTTP stream.
            await self._cancel_running(state, CancelReason.SHUTDOWN)
            if self._observer is not None and result is not None:
                self._observer.step_ended(request, result)

    async def _race(self, run: _StepRun, policy: AttemptPolicy) -> StepResult:
        feedback = policy if isinstance(policy, AttemptFeedback) else None
        blocked = False  # a refusal a policy without feedback cannot know of: wait for an attempt to end
        while True:
            now = self._clock.monotonic()
            decision = policy.decide([a.state() for a in run.attempts], now, run.deadline.at_monotonic)
            if isinstance(decision, GiveUp):
                return self._failed(run, decision.reason, decision.detail)
            wake_at = run.deadline.at_monotonic
            if isinstance(decision, Cancel):
                if decision.at <= now:  # a timeout, or a sibling showed its model will not answer
                    await self._cancel_running(run, decision.reason, only=run.attempts[decision.attempt])
                    continue
                wake_at = min(wake_at, decision.at)
            if isinstance(decision, Start) and not blocked:
                if decision.at <= now:
                    refusal = await self._start(run, decision)
                    if refusal is None:
                        if feedback is not None:
                            feedback.started(decision, now)
                        continue
                    if run.stop.is_set():
                        return await self._stopped(run)
                    if not self._running(run):
                        if run.input_error is not None:  # no request was sent: not a budget matter
                            return self._failed(run, FailureReason.INVALID_INPUT, "no request could be made")
                        return self._failed(run, FailureReason.BUDGET_EXHAUSTED, refusal)
                    # Refused while other attempts run (a duplicate without spare budget): the policy
                    # hears of it and waits on the running attempt; without feedback, wait for one to end.
                    if feedback is not None:
                        feedback.refused(decision, refusal, now)
                    else:
                        blocked = True
                    continue
                wake_at = min(wake_at, decision.at)
            finished = await self._wait(run, wake_at)
            if finished:
                blocked = False
            for attempt in finished:
                if attempt.record is not None and attempt.record.outcome == AttemptOutcome.VALID:
                    await self._cancel_running(run, CancelReason.HEDGE_LOST)
                    return self._delivered(run, attempt)
                if (
                    attempt.record is not None
                    and attempt.record.error
                    and attempt.record.error.kind == ErrorKind.LOCAL_ERROR
                ):
                    await self._cancel_running(run, CancelReason.RUN_FAILED)  # every rung would fail alike
                    return self._failed(run, FailureReason.INVALID_INPUT, "the request could not be encoded")
            if run.stop.is_set():
                return await self._stopped(run)
            if run.deadline.expired():
                await self._cancel_running(run, CancelReason.DEADLINE)
                return self._failed(run, FailureReason.DEADLINE_EXCEEDED, "step deadline reached")

    async def _stopped(self, run: _StepRun) -> StepResult:
        reason = run.stop.reason
        await self._cancel_running(run, reason)
        if reason == CancelReason.DEADLINE:
            return self._failed(run, FailureReason.DEADLINE_EXCEEDED, "the run's deadline passed (driver's backstop)")
        return self._failed(run, FailureReason.CANCELLED, "the run ended elsewhere")

    async def _wait(self, run: _StepRun, wake_at: float) -> list[_Attempt]:
        running = {a.task: a for a in run.attempts if a.task is not None and a.record is None}
        stopped = asyncio.ensure_future(run.stop.wait())
        try:
            await wait_first([stopped, *running], Deadline(wake_at, self._clock))
        finally:
            stopped.cancel()
        finished = []
        for task, attempt in running.items():
            if task.done():
                await self._finish(run, attempt, task)
                finished.append(attempt)
        return finished

    async def _start(self, run: _StepRun, decision: Start) -> str | None:
        req = run.request
        choice = req.step.models[decision.tier]
        try:
            call = self._call(req, choice, run.deadline.remaining())
        except TailraceError as exc:  # a template the input or upstream output cannot fill
            run.refusals.append(str(exc))
            run.input_error = str(exc)
            return str(exc)
        input_estimate = estimate_prompt_tokens(call.system, call.prompt)
        ask = SpendAsk(
            run_id=req.run_id,
            step_id=req.step.id,
            tenant=req.tenant,
            provider=choice.provider,
            model=choice.model,
            role=decision.role,
            input_tokens=input_estimate,
            max_output_tokens=choice.max_tokens,
            cost_usd=choice.cost_usd(input_estimate, choice.max_tokens),
            deadline_at=run.deadline.at_monotonic,
        )
        grant = await self._reserve(run, ask)
        if isinstance(grant, Refusal):
            run.refusals.append(grant.reason)
            return grant.reason
        attempt = _Attempt(
            number=len(run.attempts),
            tier=decision.tier,
            role=decision.role,
            choice=choice,
            started_at_epoch=self._clock.time(),
            progress=AttemptProgress(self._clock.monotonic()),
            grant=grant,
            call=call,
        )
        attempt.task = asyncio.create_task(self._attempt(req, call, attempt))
        self.attempts_in_flight += 1
        run.attempts.append(attempt)
        if self._observer is not None:
            self._observer.attempt_started(req, choice, decision.role)
        return None

    async def _reserve(self, run: _StepRun, ask: SpendAsk) -> Grant | Refusal:
        """Ask the gate; a gate may make an attempt wait for budget, but never past the step's deadline
        or after its run was stopped."""
        if isinstance(run.gate, RunCostGate):  # never waits: no race to set up
            return await run.gate.reserve(ask)
        reserve = asyncio.ensure_future(run.gate.reserve(ask))
        stopped = asyncio.ensure_future(run.stop.wait())
        try:
            await wait_first([reserve, stopped], run.deadline)
        finally:
            stopped.cancel()
            if not reserve.done():
                reserve.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reserve
        if reserve.done() and not reserve.cancelled():
            return reserve.result()
        return Refusal(
            "stopped while waiting for budget"
            if run.stop.is_set()
            else "budget_exhausted: the step's deadline came while waiting for budget"
        )

    def _call(self, req: StepRequest, choice: ModelChoice, remaining_s: float) -> ProviderCall:
        system, prompt = rendered_prompt(req, choice)
        headers = {"Idempotency-Key": req.idempotency_key} if req.step.side_effect else {}
        return ProviderCall(
            provider=choice.provider,
            kind=self._adapters[choice.provider].kind,
            model=choice.model,
            prompt=prompt,
            system=system,
            max_tokens=choice.max_tokens,
            temperature=choice.temperature,
            top_p=choice.top_p,
            timeout_s=max(0.05, remaining_s) + 1.0,
            headers=headers,
        )

    async def _attempt(
        self, req: StepRequest, call: ProviderCall, attempt: _Attempt
    ) -> tuple[RawAttempt, Verdict | None]:
        raw = await self._adapters[call.provider].attempt(call, attempt.progress)
        if raw.error is not None:
            return raw, None
        return raw, validate(req.step.output, raw.text, raw.stop_kind, req.inputs)

    async def _finish(
        self, run: _StepRun, attempt: _Attempt, task: asyncio.Task[tuple[RawAttempt, Verdict | None]]
    ) -> None:
        raw, verdict = task.result()
        if raw.error is not None:
            outcome = AttemptOutcome.ERROR
        elif verdict is not None and verdict.ok:
            outcome = AttemptOutcome.VALID
            attempt.value, attempt.text = verdict.value, raw.text
        else:
            outcome = AttemptOutcome.INVALID
        attempt.record = await self._record(
            run,
            attempt,
            outcome,
            latency_s=raw.latency_s,
            invalid_reason=None if verdict is None else verdict.reason,
            error=raw.error,
            stop_kind=raw.stop_kind,
        )

    async def _cancel_running(self, run: _StepRun, reason: CancelReason, only: _Attempt | None = None) -> None:
        running = [a for a in run.attempts if a.task is not None and a.record is None and (only is None or a is only)]
        for a in running:
            assert a.task is not None
            a.task.cancel()
        for a in running:
            assert a.task is not None
            try:
                await a.task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # adapters classify every provider failure: this is a bug of ours
                run_metrics.internal_error("attempt", exc)
            if a.record is not None:
                continue
            if a.task.done() and not a.task.cancelled() and a.task.exception() is None:
                await self._finish(run, a, a.task)  # it finished in the same instant; keep what it said
                continue
            a.record = await self._record(
                run,
                a,
                AttemptOutcome.CANCELLED,
                cancel_reason=reason,
                latency_s=self._clock.monotonic() - a.progress.started_mono,
            )

    async def _record(
        self, run: _StepRun, attempt: _Attempt, outcome: AttemptOutcome, *, latency_s: float, **fields: Any
    ) -> AttemptRecord:
        p = attempt.progress
        error = fields.get("error")
        # One definition of what the attempt cost, for its record (the run's cost) and the budget's ledger.
        used = attempt_usage(
            attempt.choice.cost_usd,
            attempt.grant.ask,
            outcome,
            reported_input=p.input_tokens,
            reported_output=p.output_tokens,
            received_tokens=estimate_tokens(p.text),
            rate_limit=p.rate_limit,
            status=None if error is None else error.status,
            retry_after_s=None if error is None else error.retry_after_s,
        )
        await run.gate.settle(attempt.grant, used)
        first = p.first_token_mono
        self.attempts_in_flight -= 1
        record = AttemptRecord(
            run_id=run.request.run_id,
            step_id=run.request.step.id,
            attempt=attempt.number,
            provider=attempt.choice.provider,
            model=attempt.choice.model,
            tier=attempt.tier,
            role=attempt.role,
            started_at=attempt.started_at_epoch,
            ended_at=attempt.started_at_epoch + latency_s,
            ttft_s=None if first is None else first - p.started_mono,
            latency_s=latency_s,
            input_tokens=used.input_tokens,
            output_tokens=used.output_tokens,
            usage_reported=used.reported,
            cost_usd=used.cost_usd,
            outcome=outcome,
            request_id=p.request_id,
            rate_limit=dict(p.rate_limit),
            idempotency_key=run.request.idempotency_key if run.request.step.side_effect else None,
            request=_request_of(attempt.call),
            **fields,
        )
        run_metrics.attempt_finished(run.request.workflow, record)
        if self._observer is not None:
            self._observer.attempt_ended(run.request, record)
        return record

    @staticmethod
    def _running(run: _StepRun) -> bool:
        return any(a.record is None for a in run.attempts)

    def _delivered(self, run: _StepRun, winner: _Attempt) -> StepResult:
        run.winner = winner.number
        return StepResult(
            step_id=run.request.step.id,
            ok=True,
            output=winner.value,
            text=winner.text,
            tier=winner.tier,
            model=winner.choice.model,
            attempts=self._records(run),
        )

    def _failed(self, run: _StepRun, reason: FailureReason, detail: str) -> StepResult:
        last = next((a.record for a in reversed(run.attempts) if a.record is not None), None)
        if last is not None:
            why = last.invalid_reason or (last.error.kind.value if last.error else None)
            detail += f"; last attempt: {last.model} {last.outcome.value}" + (f" ({why})" if why else "")
        if run.refusals:
            detail += f"; refused: {run.refusals[-1]}"
        return StepResult(
            step_id=run.request.step.id, ok=False, failure=reason, detail=detail, attempts=self._records(run)
        )

    @staticmethod
    def _records(run: _StepRun) -> list[AttemptRecord]:
        return [a.record for a in run.attempts if a.record is not None]


def _request_of(call: ProviderCall | None) -> AttemptRequest | None:
    if call is None:
        return None
    return AttemptRequest(
        provider=call.provider,
        kind=call.kind,
        model=call.model,
        prompt=call.prompt,
        system=call.system,
        max_tokens=call.max_tokens,
        temperature=call.temperature,
        top_p=call.top_p,
    )
