"""An exception tailrace did not expect is never silent: logged with its traceback and counted."""

from __future__ import annotations

import asyncio
import logging

from tailrace.engine.clock import FakeClock, RunDeadline
from tailrace.engine.outcomes import AttemptOutcome, CancelReason, FailureReason
from tailrace.engine.providers.base import AttemptProgress, ProviderCall, RawAttempt
from tailrace.engine.specs import ModelChoice, StepSpec
from tailrace.runtime.step_runner import StepRequest, StepRunner

STEP = StepSpec(id="s", prompt="hello", models=[ModelChoice(provider="p", model="m", max_tokens=10)])


class BrokenOnCancelAdapter:
    """Hangs, and when cancelled raises something other than CancelledError (a bug in an adapter)."""

    kind = "openai"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    async def attempt(self, call: ProviderCall, progress: AttemptProgress) -> RawAttempt:
        try:
            await self.clock.sleep(10_000)
        except asyncio.CancelledError:
            raise ValueError("cleanup failed") from None
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


async def test_an_attempt_that_raises_while_cancelled_is_logged_and_still_recorded(caplog):
    clock = FakeClock()
    runner = StepRunner({"p": BrokenOnCancelAdapter(clock)}, clock=clock)
    request = StepRequest(
        run_id="r", workflow="w", tenant="t", step=STEP, inputs={}, upstream={},
        deadline=RunDeadline(clock.time() + 1.0, return_margin_s=0.0),
    )  # fmt: skip
    task = asyncio.ensure_future(runner.run(request))
    with caplog.at_level(logging.ERROR, logger="tailrace"):
        while not task.done():
            for _ in range(10):
                await asyncio.sleep(0)
            clock.advance(0.25)
    result = task.result()
    assert result.failure == FailureReason.DEADLINE_EXCEEDED
    assert [(a.outcome, a.cancel_reason) for a in result.attempts] == [
        (AttemptOutcome.CANCELLED, CancelReason.DEADLINE)
    ]
    [logged] = [r for r in caplog.records if "internal error in attempt" in r.getMessage()]
    assert logged.exc_info is not None and isinstance(logged.exc_info[1], ValueError)
