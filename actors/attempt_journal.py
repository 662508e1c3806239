"""Where a step's attempts are known to be, so an executor's death loses no attempt record.

A step's attempt records travel back with its result; an executor that dies (its node lost, the
actor killed) takes them along, while the attempts it started may have been sent and charged. So each
executor reports what it starts and ends to a small named actor, the journal, in the background:
one call at most every `flush_interval_s`, carrying every attempt start, end and step finish since
the last (a step that starts and ends between two calls costs nothing). When the driver sees an
executor die under a step, it asks the journal for that step's attempts: ended ones come back as
they were recorded, running ones as cancelled with reason `executor_lost`, settled as their whole
reservation (prompt estimate + `max_tokens`, as a lost lease is written off as spent).

What it costs and misses: nothing on an attempt's path (a local append); attempts started within
the last `flush_interval_s` before the death are not yet known to the journal. The journal lives on
the head node, one per batch, and holds only the steps in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import ray

from tailrace.engine.clock import Clock
from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, CancelReason, StepResult
from tailrace.engine.prompts import render_messages
from tailrace.engine.specs import ModelChoice
from tailrace.engine.tokens import estimate_prompt_tokens
from tailrace.runtime import run_metrics
from tailrace.runtime.step_runner import AttemptObserver, StepRequest

log = logging.getLogger("tailrace")

NAMESPACE = "tailrace"
StepKey = tuple[str, str]  # (run id, step id)


@dataclass(frozen=True)
class AttemptStart:
    """What the journal knows of an attempt that started: enough to record it if it never returns."""

    run_id: str
    step_id: str
    attempt: int
    provider: str
    model: str
    tier: int
    role: str
    started_at: float  # wall-clock epoch
    input_tokens: int  # the prompt estimate the attempt reserved
    max_tokens: int
    cost_usd: float  # the reservation's cost: what a lost attempt is settled as

    def lost(self, now_epoch: float) -> AttemptRecord:
        """This attempt as its executor's death left it: cancelled, reason `executor_lost`."""
        return AttemptRecord(
            run_id=self.run_id,
            step_id=self.step_id,
            attempt=self.attempt,
            provider=self.provider,
            model=self.model,
            tier=self.tier,
            role=self.role,
            started_at=self.started_at,
            ended_at=max(self.started_at, now_epoch),
            latency_s=max(0.0, now_epoch - self.started_at),
            input_tokens=self.input_tokens,
            output_tokens=self.max_tokens,
            usage_reported=False,
            cost_usd=self.cost_usd,
            outcome=AttemptOutcome.CANCELLED,
            cancel_reason=CancelReason.EXECUTOR_LOST,
        )


# One journal entry: ("start", AttemptStart) | ("end", AttemptRecord) | ("done", StepKey)
Entry = tuple[str, Any]


@ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)
class AttemptJournal:
    """The attempts of the steps in flight, by (run, step), as executors report them."""

    def __init__(self) -> None:
        self._steps: dict[StepKey, dict[int, AttemptStart | AttemptRecord]] = {}
        self.reports = 0

    def report(self, entries: list[Entry]) -> None:
        self.reports += 1
        for kind, item in entries:
            if kind == "done":
                self._steps.pop(item, None)
            else:
                self._steps.setdefault((item.run_id, item.step_id), {})[item.attempt] = item

    def lost(self, run_id: str, step_id: str, now_epoch: float) -> list[AttemptRecord]:
        """The step's attempts on an executor that died under it (and forget them: the step moves on)."""
        attempts = self._steps.pop((run_id, step_id), {})
        return [a if isinstance(a, AttemptRecord) else a.lost(now_epoch) for _, a in sorted(attempts.items())]

    def stats(self) -> dict[str, int]:
        return {"steps": len(self._steps), "reports": self.reports}


HEAD_RESOURCE = "node:__internal_head__"  # every Ray head node offers it


def start_journal(name: str) -> Any:
    """A journal for one batch, on the head node: it must outlive the nodes executors run on. (Not "the
    driver's node": where several nodes share one IP, as on one machine, a driver may attach to a worker.)"""
    return AttemptJournal.options(name=name, namespace=NAMESPACE, resources={HEAD_RESOURCE: 0.001}).remote()


async def lost_attempts(journal: Any, run_id: str, step_id: str, now_epoch: float, within: Any) -> list[AttemptRecord]:
    """Ask the journal for a step whose executor died; [] when the journal cannot say in time."""
    from tailrace.engine.clock import wait_for

    try:
        return list(
            await wait_for(asyncio.wrap_future(journal.lost.remote(run_id, step_id, now_epoch).future()), within)
        )
    except Exception as exc:  # an unanswered journal costs the records, never the run
        run_metrics.internal_error("attempt_journal", exc)
        return []


class JournalReporter:
    """The executor's side: buffers starts, ends and step finishes, and sends them in one call per
    interval from a background task. Everything on an attempt's path is a list append."""

    def __init__(self, name: str, clock: Clock, interval_s: float = 0.1) -> None:
        self._name = name
        self._clock = clock
        self._interval_s = interval_s
        self._pending: list[tuple[str, Any]] = []
        self._counts: dict[StepKey, int] = {}  # attempts started per step here, to number them as the runner does
        self._actor: Any = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):  # the batch is over: a journal already gone loses nothing
            await self.flush()

    # -- on the attempt's path: appends only -------------------------------------------------------

    def started(self, request: StepRequest, choice: ModelChoice, role: str) -> None:
        key = (request.run_id, request.step.id)
        number = self._counts.get(key, 0)
        self._counts[key] = number + 1
        self._pending.append(("start", (request, choice, role, number, self._clock.time())))

    def ended(self, record: AttemptRecord) -> None:
        self._pending.append(("end", record))

    def step_done(self, run_id: str, step_id: str) -> None:
        self._counts.pop((run_id, step_id), None)
        self._pending.append(("done", (run_id, step_id)))

    # -- in the background --------------------------------------------------------------------------

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        entries = _compact(pending)
        if not entries:
            return
        if self._actor is None:  # a GCS lookup: off the event loop, which runs the attempts
            self._actor = await asyncio.to_thread(ray.get_actor, self._name, namespace=NAMESPACE)
        await self._actor.report.remote(entries)
        self.sent += 1

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the journal is a safety net: never let it take a step down
                self._actor = None
                log.warning("attempt journal report failed: %s", type(exc).__name__)


def _compact(pending: list[tuple[str, Any]]) -> list[Entry]:
    """The entries worth sending: a step that started and finished since the last report is left out."""
    finished = {item for kind, item in pending if kind == "done"}
    entries: list[Entry] = []
    for kind, item in pending:
        if kind == "start":
            request, choice, role, number, started_at = item
            if (request.run_id, request.step.id) in finished:
                continue
            entries.append(("start", _start_of(request, choice, role, number, started_at)))
        elif kind == "end":
            if (item.run_id, item.step_id) not in finished:
                entries.append(("end", item.model_copy(update={"request": None})))  # prompts stay here
        else:
            entries.append(("done", item))
    return entries


def _start_of(request: StepRequest, choice: ModelChoice, role: str, number: int, started_at: float) -> AttemptStart:
    # The same estimate the runner reserved with (engine.prompts renders what the attempt sent).
    try:
        system, prompt = render_messages(request.step, choice, request.inputs, request.upstream)
        input_tokens = estimate_prompt_tokens(system, prompt)
    except Exception:  # it could not have been sent either; what matters is that it is recorded
        input_tokens = 0
    tier = next((i for i, m in enumerate(request.step.models) if m is choice), None)
    if tier is None:
        tier = request.step.models.index(choice) if choice in request.step.models else 0
    return AttemptStart(
        run_id=request.run_id,
        step_id=request.step.id,
        attempt=number,
        provider=choice.provider,
        model=choice.model,
        tier=tier,
        role=role,
        started_at=started_at,
        input_tokens=input_tokens,
        max_tokens=choice.max_tokens,
        cost_usd=choice.cost_usd(input_tokens, choice.max_tokens),
    )


class JournalingObserver:
    """An `AttemptObserver` that tells the journal reporter, then the observer it wraps."""

    def __init__(self, inner: AttemptObserver, reporter: JournalReporter) -> None:
        self._inner = inner
        self._reporter = reporter

    def attempt_started(self, request: StepRequest, choice: ModelChoice, role: str) -> None:
        self._reporter.started(request, choice, role)
        self._inner.attempt_started(request, choice, role)

    def attempt_ended(self, request: StepRequest, record: AttemptRecord) -> None:
        self._reporter.ended(record)
        self._inner.attempt_ended(request, record)

    def step_ended(self, request: StepRequest, result: StepResult) -> None:
        self._inner.step_ended(request, result)
