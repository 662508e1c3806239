"""The driver sets a run's deadline epoch once: every step request of the run carries the same value,
whatever the driver's wall clock does meanwhile, and run latency is measured on the monotonic clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from tailrace.cluster.driver import WorkflowDriver
from tailrace.engine.clock import FakeClock
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, CancelReason, FailureReason, StepResult
from tailrace.engine.specs import RunOptions

CHAIN = workflow_from_dict(
    {
        "name": "chain",
        "inputs": ["x"],
        "steps": [
            {"id": "a", "prompt": "{{input.x}}", "models": [{"provider": "openai", "model": "m", "max_tokens": 5}]},
            {
                "id": "b",
                "prompt": "{{steps.a}}",
                "depends_on": ["a"],
                "models": [{"provider": "openai", "model": "m", "max_tokens": 5}],
            },
            {
                "id": "c",
                "prompt": "{{steps.b}}",
                "depends_on": ["b"],
                "models": [{"provider": "openai", "model": "m", "max_tokens": 5}],
            },
        ],
    }
)


class SteppingExecutor:
    """Answers every step at once, 0.5 s of monotonic time later, while NTP yanks the wall clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.requests = []
        self.run_step = SimpleNamespace(remote=self._run_step)
        self.cancel_run = SimpleNamespace(remote=lambda run_id: None)

    def _run_step(self, request):
        self.requests.append(request)
        self.clock.step_wall_clock(+120.0)
        self.clock.advance(0.5)
        return asyncio.ensure_future(self._answer(request))

    async def _answer(self, request) -> StepResult:
        return StepResult(step_id=request.step.id, ok=True, output="ok")


async def test_every_step_request_of_a_run_carries_the_one_deadline_epoch():
    clock = FakeClock()
    executor = SteppingExecutor(clock)
    driver = WorkflowDriver(CHAIN, RunOptions(deadline_s=10), [executor], clock=clock)
    started_wall = clock.time()
    outcome = await driver.run("r1", {"x": "1"})
    assert outcome.delivered
    assert [r.step.id for r in executor.requests] == ["a", "b", "c"]
    assert {r.deadline.epoch_s for r in executor.requests} == {started_wall + 10}
    assert outcome.deadline_at == started_wall + 10
    assert outcome.latency_s == 1.5  # 3 x 0.5 s of monotonic time; the 360 s of wall jumps do not count
    assert outcome.on_time


# ---- the backstop, on the injected clock -------------------------------------------------------------

ONE_STEP = workflow_from_dict(
    {
        "name": "one",
        "inputs": ["x"],
        "steps": [
            {"id": "a", "prompt": "{{input.x}}", "models": [{"provider": "openai", "model": "m", "max_tokens": 5}]}
        ],
    }
)


class SilentExecutor:
    """Takes the step and never answers by itself (starved, partitioned or on a clock that runs late).
    `answers_cancel`: a cancel_run is answered at once with the attempt cancelled for the reason given."""

    def __init__(self, clock: FakeClock, answers_cancel: bool) -> None:
        self.clock = clock
        self.answers_cancel = answers_cancel
        self.cancels: list[tuple[float, str, CancelReason]] = []
        self.results: dict[str, asyncio.Future[StepResult]] = {}
        self.run_step = SimpleNamespace(remote=self._run_step)
        self.cancel_run = SimpleNamespace(remote=self._cancel_run)

    def _run_step(self, request) -> asyncio.Future[StepResult]:
        future = asyncio.get_running_loop().create_future()
        self.results[request.run_id] = future
        return future

    def _cancel_run(self, run_id: str, reason: CancelReason) -> None:
        self.cancels.append((self.clock.monotonic(), run_id, reason))
        if self.answers_cancel:
            attempt = AttemptRecord(
                run_id=run_id, step_id="a", attempt=0, provider="openai", model="m", tier=0, role="primary",
                started_at=0.0, ended_at=0.0, latency_s=0.0, input_tokens=3, output_tokens=0, cost_usd=0.0,
                outcome=AttemptOutcome.CANCELLED, cancel_reason=reason,
            )  # fmt: skip
            self.results[run_id].set_result(
                StepResult(step_id="a", ok=False, failure=FailureReason.DEADLINE_EXCEEDED, attempts=[attempt])
            )


async def drive(clock: FakeClock, task: asyncio.Task, step_s: float = 0.125) -> None:
    """Advance fake time in exact binary steps until the task ends."""
    while not task.done():
        for _ in range(50):  # let every ready callback run before time moves
            await asyncio.sleep(0)
        if not task.done():
            clock.advance(step_s)


async def test_backstop_stops_a_silent_executor_at_deadline_plus_half_grace_and_ends_the_run_within_the_grace():
    clock = FakeClock()
    executor = SilentExecutor(clock, answers_cancel=False)
    driver = WorkflowDriver(ONE_STEP, RunOptions(deadline_s=1.0), [executor], clock=clock, grace_s=0.25)
    start = clock.monotonic()
    task = asyncio.ensure_future(driver.run("r1", {"x": "1"}))
    await drive(clock, task, step_s=0.0625)
    outcome = task.result()
    assert outcome.failure == FailureReason.DEADLINE_EXCEEDED and outcome.failed_step == "a"
    assert executor.cancels == [(start + 1.125, "r1", CancelReason.DEADLINE)]  # deadline + grace / 2
    # Records are awaited until deadline + 3/4 grace, exactly, on the injected clock: the last quarter of
    # the grace is the event loop's headroom to stamp the outcome by deadline + grace.
    assert outcome.latency_s == 1.1875
    assert outcome.attempts == []  # the executor never answered: nothing to record


async def test_records_that_come_back_within_the_grace_are_kept_with_reason_deadline():
    clock = FakeClock()
    executor = SilentExecutor(clock, answers_cancel=True)
    driver = WorkflowDriver(ONE_STEP, RunOptions(deadline_s=1.0), [executor], clock=clock, grace_s=0.25)
    task = asyncio.ensure_future(driver.run("r1", {"x": "1"}))
    await drive(clock, task)
    outcome = task.result()
    assert outcome.failure == FailureReason.DEADLINE_EXCEEDED
    assert outcome.latency_s == 1.125  # the answer to the backstop's cancel came at once
    assert [(a.outcome, a.cancel_reason) for a in outcome.attempts] == [
        (AttemptOutcome.CANCELLED, CancelReason.DEADLINE)
    ]


async def test_a_step_that_failed_cancels_its_siblings_with_reason_run_failed_before_the_deadline():
    clock = FakeClock()
    parallel = workflow_from_dict(
        {
            "name": "two",
            "inputs": ["x"],
            "steps": [
                {"id": "a", "prompt": "{{input.x}}", "models": [{"provider": "openai", "model": "m", "max_tokens": 5}]},
                {"id": "b", "prompt": "{{input.x}}", "models": [{"provider": "openai", "model": "m", "max_tokens": 5}]},
            ],
        }
    )

    class FailingB(SilentExecutor):
        def _run_step(self, request):
            if request.step.id == "b":
                future = asyncio.get_running_loop().create_future()
                future.set_result(StepResult(step_id="b", ok=False, failure=FailureReason.INVALID_OUTPUT, detail="x"))
                return future
            return super()._run_step(request)

    executor = FailingB(clock, answers_cancel=True)
    driver = WorkflowDriver(parallel, RunOptions(deadline_s=10.0), [executor], clock=clock)
    task = asyncio.ensure_future(driver.run("r1", {"x": "1"}))
    await drive(clock, task)
    outcome = task.result()
    assert outcome.failure == FailureReason.INVALID_OUTPUT and outcome.failed_step == "b"
    assert [c[2] for c in executor.cancels] == [CancelReason.RUN_FAILED]
    assert outcome.latency_s == 0.0
