"""The absolute deadline is converted to the receiver's monotonic clock once, on arrival: queueing on
the way is counted, a wall-clock step cannot stretch it, and a skewed receiver is off by exactly its skew."""

from __future__ import annotations

import asyncio

from tailrace.engine.clock import FakeClock, RunDeadline
from tailrace.engine.outcomes import CancelReason, FailureReason
from tailrace.engine.providers.base import AttemptProgress, ProviderCall, RawAttempt
from tailrace.engine.specs import ModelChoice, StepSpec
from tailrace.runtime.step_runner import StepRequest, StepRunner

STEP = StepSpec(id="s", prompt="hello", models=[ModelChoice(provider="p", model="m", max_tokens=10)])


class HangingAdapter:
    """A provider that never answers (the attempt waits on the fake clock until cancelled)."""

    kind = "openai"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    async def attempt(self, call: ProviderCall, progress: AttemptProgress) -> RawAttempt:
        await self.clock.sleep(10_000)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


def request(deadline_epoch: float) -> StepRequest:
    deadline = RunDeadline(deadline_epoch, return_margin_s=0.0)
    return StepRequest(run_id="r", workflow="w", tenant="t", step=STEP, inputs={}, upstream={}, deadline=deadline)


async def run_until_done(clock: FakeClock, task: asyncio.Task, step_s: float = 0.01, limit_s: float = 60.0) -> float:
    """Advance fake time until the task ends; the fake time it took."""
    start = clock.monotonic()
    while not task.done():
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        clock.advance(step_s)
        assert clock.monotonic() - start < limit_s
    return clock.monotonic() - start


async def test_time_spent_queueing_before_arrival_is_counted():
    sender = FakeClock()
    deadline = sender.time() + 2.0  # the driver sets it: 2 s from now
    sender.advance(1.5)  # the request waits 1.5 s before the executor takes it
    runner = StepRunner({"p": HangingAdapter(sender)}, clock=sender)
    task = asyncio.ensure_future(runner.run(request(deadline)))
    took = await run_until_done(sender, task)
    result = task.result()
    assert result.failure == FailureReason.DEADLINE_EXCEEDED
    assert 0.5 <= took < 0.6  # only what was left of the 2 s
    assert [a.cancel_reason for a in result.attempts] == [CancelReason.DEADLINE]


async def test_a_wall_clock_step_after_arrival_does_not_stretch_the_deadline():
    clock = FakeClock()
    runner = StepRunner({"p": HangingAdapter(clock)}, clock=clock)
    task = asyncio.ensure_future(runner.run(request(clock.time() + 1.0)))
    await asyncio.sleep(0)
    clock.step_wall_clock(+3600)  # NTP jumps the wall clock an hour ahead mid-step
    took = await run_until_done(clock, task)
    assert task.result().failure == FailureReason.DEADLINE_EXCEEDED
    assert 1.0 <= took < 1.1


async def test_a_receiver_whose_wall_clock_is_ahead_ends_early_by_exactly_the_skew():
    driver = FakeClock(wall_offset=1_700_000_000.0)
    executor = FakeClock(wall_offset=1_700_000_000.0 + 0.4)  # its wall clock runs 0.4 s ahead
    deadline = driver.time() + 1.0
    runner = StepRunner({"p": HangingAdapter(executor)}, clock=executor)
    task = asyncio.ensure_future(runner.run(request(deadline)))

    async def advance_both() -> float:
        start = executor.monotonic()
        while not task.done():
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            driver.advance(0.01)
            executor.advance(0.01)
        return executor.monotonic() - start

    took = await advance_both()
    assert task.result().failure == FailureReason.DEADLINE_EXCEEDED
    assert 0.6 <= took < 0.7  # 1.0 s minus the 0.4 s skew: the documented assumption
