"""Latency windows shared by every executor: a small named stats actor, and the loop that syncs with it.

Each executor keeps its own windows (the policies read them on the hot path, with no call out) and,
in the background every `sync_interval_s`, pushes what it observed since the last sync and pulls what
the others observed since then, in one call. So a new executor starts warm after its first sync, and
all of them see a brownout together, a second apart at most. The actor keeps per-model samples bounded
in time and count, each tagged with a sequence number, so a pull is "everything after my cursor
that is not mine". Losing the actor loses nothing that matters: each executor still has its own
windows, and the next sync recreates it (`get_if_exists`) and fills it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from typing import Any

import ray

from tailrace.engine.clock import SYSTEM_CLOCK, Clock
from tailrace.policies.latency import LatencyConfig, LatencyStats, Sample, Snapshot

log = logging.getLogger("tailrace")

DEFAULT_STATS_NAME = "tailrace-latency-stats"
NAMESPACE = "tailrace"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
class LatencyStatsActor:
    def __init__(self, config: LatencyConfig | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._config = config or LatencyConfig()
        self._clock = clock
        self._seq = itertools.count(1)
        self._last = 0
        # model -> (seq, source, sample), oldest first
        self._samples: dict[str, deque[tuple[int, str, Sample]]] = {}

    def exchange(self, source: str, new: Snapshot, since: int) -> tuple[Snapshot, int]:
        """Store `source`'s new samples; return the others' samples after cursor `since`, and the new cursor."""
        horizon = self._clock.time() - self._config.window_s
        for model, samples in new.items():
            window = self._samples.setdefault(model, deque(maxlen=self._config.max_samples))
            for s in samples:
                self._last = next(self._seq)
                window.append((self._last, source, s))
        out: Snapshot = {}
        for model, window in self._samples.items():
            while window and window[0][2].at < horizon:
                window.popleft()
            theirs = [s for seq, src, s in window if seq > since and src != source]
            if theirs:
                out[model] = theirs
        return out, self._last

    def counts(self) -> dict[str, int]:
        return {model: len(window) for model, window in self._samples.items()}


def stats_actor(name: str = DEFAULT_STATS_NAME, config: LatencyConfig | None = None) -> Any:
    """The named stats actor, created on first use (by whoever asks first)."""
    return LatencyStatsActor.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(config)


class StatsSync:
    """Syncs one executor's `LatencyStats` with the named stats actor, off the hot path."""

    def __init__(self, stats: LatencyStats, name: str, source: str, interval_s: float) -> None:
        self._stats = stats
        self._name = name
        self._source = source
        self._interval_s = interval_s
        self._cursor = 0
        self._actor: Any = None
        self._task: asyncio.Task[None] | None = None
        self.syncs = 0

    def start(self) -> None:
        """Start the background loop in the running event loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def sync_once(self) -> None:
        if self._actor is None:
            self._actor = stats_actor(self._name, self._stats.config)
        new = self._stats.take_new()
        try:
            theirs, cursor = await self._actor.exchange.remote(self._source, new, self._cursor)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            log.info("latency stats actor unavailable (%s); will retry", type(exc).__name__)
            self._actor, self._cursor = None, 0
            return
        # A restarted actor numbers from 1 again: read everything it has next time.
        self._cursor = cursor if cursor >= self._cursor else 0
        self._stats.merge(theirs)
        self.syncs += 1

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let statistics sharing take a step down with it
                log.warning("latency stats sync failed: %s", type(exc).__name__)
                self._actor = None
            await asyncio.sleep(self._interval_s)
