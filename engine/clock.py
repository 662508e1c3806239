"""Time for every component: a `Clock` protocol, the real clock, a fake one for tests, `Deadline`, and
`RunDeadline`, the one object that owns a run's time.

This is the only module that reads the real clock: everything else takes a `Clock` (and waits with
`wait_first` / `wait_all` below, never with `asyncio.wait(timeout=...)`, which reads the loop's clock).

Deadlines are absolute. A run's deadline is a wall-clock epoch set once by the driver; each receiver
converts it to its own monotonic clock on arrival (`Deadline.from_epoch`) and never reads the wall
clock again for that work, so queueing on the way is counted and an NTP step cannot stretch it.
Clock-sync assumption: nodes' wall clocks agree to within a few milliseconds (NTP/chrony); a skew
between sender and receiver shifts the deadline by exactly that skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True)
class SkewedClock:
    """The real clock on a node whose wall clock is `wall_offset_s` off (positive: ahead).

    For tests and drills of the clock-sync assumption: an executor built with it converts a
    deadline epoch to a monotonic deadline that is off by exactly the skew. Picklable, so it can be
    handed to an actor on another node.
    """

    wall_offset_s: float

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time() + self.wall_offset_s

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock tests advance by hand. `sleep` waits until `advance` moves time past its wake-up."""

    def __init__(self, start: float = 1_000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._ids = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    def step_wall_clock(self, seconds: float) -> None:
        """Simulate an NTP step: the wall clock jumps, the monotonic clock does not."""
        self._wall_offset += seconds

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._ids), fut))
        await fut

    def advance(self, seconds: float) -> None:
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def next_wake(self) -> float | None:
        """When the earliest sleeper still waiting wakes up (None: nobody sleeps). For drivers that
        jump time to the next event instead of stepping it (`tailrace.whatif.virtual_time`)."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # a sleep that was cancelled
        return self._sleepers[0][0] if self._sleepers else None


@dataclass(frozen=True)
class Deadline:
    """An absolute deadline on one process's monotonic clock."""

    at_monotonic: float
    clock: Clock

    @classmethod
    def from_epoch(cls, epoch_s: float, clock: Clock) -> Deadline:
        return cls(clock.monotonic() + (epoch_s - clock.time()), clock)

    @classmethod
    def after(cls, seconds: float, clock: Clock) -> Deadline:
        return cls(clock.monotonic() + seconds, clock)

    @classmethod
    def never(cls, clock: Clock) -> Deadline:
        return cls(math.inf, clock)

    def remaining(self) -> float:
        return self.at_monotonic - self.clock.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def to_epoch(self) -> float:
        """The wall-clock epoch to send to another process."""
        return self.clock.time() + self.remaining()

    def earlier(self, seconds: float) -> Deadline:
        """The deadline no later than `seconds` from now."""
        return Deadline(min(self.at_monotonic, self.clock.monotonic() + seconds), self.clock)


DEFAULT_RETURN_MARGIN_S = 0.05  # executors end their work this much early, so results travel back in time
DEFAULT_GRACE_S = 0.25  # nothing of a run outlives its deadline by more than this


@dataclass(frozen=True)
class RunDeadline:
    """A run's time, owned by one object: the absolute deadline, what remains of it, the margin an
    executor keeps to send its result back, and the grace the driver's backstop allows.

    The driver sets it once (`start`). It travels with every step request as its epoch alone (pickling
    drops the local part), and each receiver binds it to its own clock on arrival (`arrive`): the one
    conversion of the wall-clock epoch to that process's monotonic clock, after which the wall clock is
    never read again for the run, so queueing on the way counts and an NTP step cannot stretch it.
    """

    epoch_s: float
    return_margin_s: float = DEFAULT_RETURN_MARGIN_S
    grace_s: float = DEFAULT_GRACE_S
    at: float | None = None  # the deadline on `clock`'s monotonic time, once bound
    clock: Clock | None = None

    @classmethod
    def start(
        cls,
        seconds: float,
        clock: Clock,
        *,
        return_margin_s: float = DEFAULT_RETURN_MARGIN_S,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> RunDeadline:
        """A new run's deadline, `seconds` from now (the driver, once per run)."""
        now = clock.monotonic()
        return cls(clock.time() + seconds, return_margin_s, grace_s, now + seconds, clock)

    def arrive(self, clock: Clock) -> RunDeadline:
        """This deadline on the receiver's clock: converted once, on arrival."""
        return RunDeadline(
            self.epoch_s, self.return_margin_s, self.grace_s, clock.monotonic() + (self.epoch_s - clock.time()), clock
        )

    def __reduce__(self) -> tuple[type[RunDeadline], tuple[float, float, float]]:
        # What travels is the absolute epoch; a monotonic time means nothing in another process.
        return (RunDeadline, (self.epoch_s, self.return_margin_s, self.grace_s))

    def _bound(self) -> tuple[float, Clock]:
        if self.at is None or self.clock is None:
            raise RuntimeError("RunDeadline used before arrive(clock) bound it to this process's clock")
        return self.at, self.clock

    @property
    def deadline(self) -> Deadline:
        """The run's deadline itself."""
        at, clock = self._bound()
        return Deadline(at, clock)

    @property
    def work_deadline(self) -> Deadline:
        """Where an executor stops working on the run: the return margin before the deadline."""
        at, clock = self._bound()
        return Deadline(at - self.return_margin_s, clock)

    @property
    def backstop(self) -> Deadline:
        """When the driver stops a run whose executors have not answered: half the grace after it."""
        at, clock = self._bound()
        return Deadline(at + self.grace_s / 2, clock)

    @property
    def collect(self) -> Deadline:
        """When the driver stops waiting for stopped steps' records: three quarters into the grace. The
        last quarter is headroom for a busy event loop, so the outcome is stamped by `end`."""
        at, clock = self._bound()
        return Deadline(at + self.grace_s * 0.75, clock)

    @property
    def end(self) -> Deadline:
        """Nothing of the run outlives this: deadline + grace."""
        at, clock = self._bound()
        return Deadline(at + self.grace_s, clock)

    def remaining(self) -> float:
        return self.deadline.remaining()

    def expired(self) -> bool:
        return self.remaining() <= 0


async def wait_first(aws: Iterable[asyncio.Future[Any]], until: Deadline) -> set[asyncio.Future[Any]]:
    """Wait until one of `aws` is done or `until` comes, on `until`'s clock; the futures that are done."""
    aws = list(aws)
    timer = asyncio.ensure_future(until.clock.sleep(until.remaining()))
    try:
        await asyncio.wait([*aws, timer], return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
    return {a for a in aws if a.done()}


async def wait_all(aws: Iterable[asyncio.Future[Any]], until: Deadline) -> set[asyncio.Future[Any]]:
    """Wait until all of `aws` are done or `until` comes, on `until`'s clock; the futures that are done."""
    aws = list(aws)
    pending = {a for a in aws if not a.done()}
    done = {a for a in aws if a.done()}
    while pending and not until.expired():
        done |= await wait_first(pending, until)
        pending -= done
    return done


async def wait_for(aw: Awaitable[T], until: Deadline) -> T:
    """`aw`'s result, or `TimeoutError` (with `aw` cancelled) if `until` comes first, on `until`'s clock."""
    task = asyncio.ensure_future(aw)
    if not await wait_first([task], until):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise TimeoutError(f"not done within the deadline ({until.remaining():.3f} s left)")
    return task.result()
