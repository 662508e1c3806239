"""Time for every component: a `Clock` protocol, the real clock, a fake one for tests, and `Deadline`.

Deadlines are absolute. A run's deadline is a wall-clock epoch set once by the driver; each receiver
converts it to its own monotonic clock on arrival (`Deadline.from_epoch`) and never reads the wall
clock again for that work, so queueing on the way is counted and an NTP step cannot stretch it.
Clock-sync assumption: nodes' wall clocks agree to within a few milliseconds (NTP/chrony); a skew
between sender and receiver shifts the deadline by exactly that skew.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from dataclasses import dataclass
from typing import Protocol


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
