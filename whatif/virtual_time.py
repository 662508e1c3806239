"""Run asyncio code on a `FakeClock` as fast as it can go: when every task waits, time jumps to the
next sleeper's wake-up instead of passing.

`run_on_fake_time(main, clock)` runs `main` on its own event loop whose selector never finds I/O
ready. When the loop has callbacks ready it runs them; when it would block (every task waits on the
clock), the selector moves the clock to its earliest sleeper, which wakes that task. So an hour of
simulated traffic costs only the CPU of the events in it, and the order of events is exactly the
order of their times (ties in the order they were scheduled), which makes a run reproducible.

Only code that waits through the `FakeClock` (tailrace's `Clock` protocol, `engine.clock.wait_*`)
runs here; nothing may do real I/O. A loop where every task waits and no sleeper is left is stuck
(a deadlock in the code under test): it raises `StuckError` instead of hanging.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from tailrace.engine.clock import FakeClock

T = TypeVar("T")


class StuckError(RuntimeError):
    """Every task waits and nothing will ever wake one of them."""


class _JumpingSelector(selectors.BaseSelector):
    """A selector with nothing to select: where the loop would wait for I/O, the clock jumps."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self._keys: dict[Any, selectors.SelectorKey] = {}
        self.jumps = 0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        # Only the loop's own wake-up pipe is ever registered; it is never read (no other thread calls in).
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return []  # callbacks are ready: run them first
        wake = self._clock.next_wake()
        if wake is None:
            if timeout is None:
                raise StuckError("every task waits and no sleeper is left on the fake clock")
            return []  # a timer of the loop's own (real time); nothing of ours uses one
        self._clock.advance(max(0.0, wake - self._clock.monotonic()))
        self.jumps += 1
        return []

    def close(self) -> None:
        self._keys.clear()


def run_on_fake_time(main: Coroutine[Any, Any, T], clock: FakeClock) -> T:
    """Run `main` to completion on `clock`, jumping time whenever every task waits.

    Safe to call from code that already runs an event loop (a notebook, an async server): the
    replay then runs on a thread of its own, since one thread runs one loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run(main, clock)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(_run(main, clock))
        except BaseException as exc:  # handed back to the caller's thread as is
            error.append(exc)

    thread = threading.Thread(target=target, name="tailrace-fake-time")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _run(main: Coroutine[Any, Any, T], clock: FakeClock) -> T:
    loop = asyncio.SelectorEventLoop(_JumpingSelector(clock))
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_leftovers(loop)
        finally:
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Tasks `main` left behind (background loops of a gate, say) are cancelled, on fake time too."""
    leftovers = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))


__all__ = ["StuckError", "run_on_fake_time"]
