"""The driver sets a run's deadline epoch once: every step request of the run carries the same value,
whatever the driver's wall clock does meanwhile, and run latency is measured on the monotonic clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from tailrace.cluster.driver import WorkflowDriver
from tailrace.engine.clock import FakeClock
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import StepResult
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
    assert {r.deadline_epoch for r in executor.requests} == {started_wall + 10}
    assert outcome.deadline_at == started_wall + 10
    assert outcome.latency_s == 1.5  # 3 x 0.5 s of monotonic time; the 360 s of wall jumps do not count
    assert outcome.on_time
