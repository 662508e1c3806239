"""The fake-time driver: time jumps to the next sleeper, events run in time order, a deadlock is an error."""

from __future__ import annotations

import asyncio
import time

import pytest

from tailrace.engine.clock import Deadline, FakeClock, wait_first
from tailrace.whatif.virtual_time import StuckError, run_on_fake_time


def test_an_hour_of_sleeps_takes_no_time_and_wakes_in_order():
    clock = FakeClock(start=0.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.monotonic()))

    async def main() -> float:
        await asyncio.gather(sleeper("c", 3600.0), sleeper("a", 1.5), sleeper("b", 1.5), sleeper("d", 0.25))
        return clock.monotonic()

    started = time.perf_counter()
    assert run_on_fake_time(main(), clock) == 3600.0
    assert time.perf_counter() - started < 1.0
    assert woke == [("d", 0.25), ("a", 1.5), ("b", 1.5), ("c", 3600.0)]  # ties in the order they slept


def test_deadlines_and_cancelled_sleeps_are_exact():
    clock = FakeClock(start=10.0)

    async def main() -> tuple[float, bool]:
        never = asyncio.get_running_loop().create_future()
        done = await wait_first([never], Deadline.after(2.5, clock))  # its timer sleep is cancelled after
        await clock.sleep(0.5)
        return clock.monotonic(), bool(done)

    assert run_on_fake_time(main(), clock) == (13.0, False)


def test_waiting_on_something_that_never_comes_is_a_stuck_error():
    clock = FakeClock()

    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(StuckError):
        run_on_fake_time(main(), clock)


def test_tasks_left_behind_are_cancelled_when_main_returns():
    clock = FakeClock()
    cancelled = []

    async def forever() -> None:
        try:
            while True:
                await clock.sleep(1.0)
        except asyncio.CancelledError:
            cancelled.append(clock.monotonic())
            raise

    async def main() -> None:
        left_behind = asyncio.ensure_future(forever())
        await clock.sleep(3.5)
        assert not left_behind.done()

    run_on_fake_time(main(), clock)
    assert cancelled == [1003.5]


async def test_it_runs_from_inside_a_running_event_loop():
    clock = FakeClock(start=0.0)

    async def main() -> float:
        await clock.sleep(42.0)
        return clock.monotonic()

    assert run_on_fake_time(main(), clock) == 42.0
