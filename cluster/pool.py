"""The executor pool: owns the step executor actors, spreads them over nodes, grows when steps or
attempts in flight per executor exceed a target, shrinks when over-provisioned for a while,
replaces dead executors, and makes the Ray autoscaler add nodes through logical resources.

The driver leases an executor for each step dispatch (`lease`), gives it back when the step
returns (`give_back`) and reports an executor that died under it (`lost`); the step is then
re-dispatched to another executor while its run's deadline allows. Pending executors (no node has
the resources they ask for) are what the autoscaler scales on; `request_resources` is sent as a hint
with the pool's wanted size. Sizing is a pure function (`wanted_size`, `Scaler`) tested on fake time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tailrace.engine.clock import SYSTEM_CLOCK, Clock, Deadline, wait_first
from tailrace.engine.errors import TailraceError
from tailrace.runtime import run_metrics


class NoExecutorError(TailraceError):
    """No executor became available before the deadline of the work that needed one."""


@dataclass(frozen=True)
class Lease:
    executor: Any  # the actor handle
    key: int


class ExecutorSource(Protocol):
    """What the driver needs from a set of executors."""

    async def lease(self, deadline: Deadline, avoid: Any = None) -> Lease: ...

    def give_back(self, lease: Lease) -> None: ...

    def lost(self, lease: Lease) -> bool:
        """The executor died with a step in flight; True if the step may be re-dispatched."""
        ...


class PoolConfig(BaseModel):
    """Bounds and behaviour of the executor pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_executors: int = Field(default=1, ge=1)
    max_executors: int = Field(default=8, ge=1)
    # Steps (or attempts, as executors report them) in flight per executor before the pool grows.
    target_in_flight: int = Field(default=32, ge=1)
    executor_num_cpus: float = Field(default=0.5, ge=0)
    # Custom logical resources per executor, e.g. {"tailrace_executor": 1}: only nodes that offer them
    # host executors, and pending executors make the autoscaler add such nodes.
    executor_resources: dict[str, float] = Field(default_factory=dict)
    spread: bool = True  # SPREAD scheduling: one node's loss hurts less
    scale_interval_s: float = Field(default=0.5, gt=0)
    scale_down_after_s: float = Field(default=10.0, ge=0)  # over-provisioned this long before shrinking
    health_timeout_s: float = Field(default=2.0, gt=0)
    replace_after_s: float = Field(default=5.0, ge=0)  # unreachable this long: killed and replaced
    start_timeout_s: float = Field(default=60.0, gt=0)  # start() waits this long for min_executors
    request_resources: bool = True  # send the wanted size to the autoscaler

    @model_validator(mode="after")
    def _check(self) -> PoolConfig:
        if self.min_executors > self.max_executors:
            raise ValueError(f"min_executors ({self.min_executors}) > max_executors ({self.max_executors})")
        return self

    @classmethod
    def fixed(cls, n: int, **kwargs: Any) -> PoolConfig:
        return cls(min_executors=n, max_executors=n, **kwargs)

    def shape(self) -> dict[str, float]:
        """One executor's logical resources, as the autoscaler sees them."""
        shape = {"CPU": self.executor_num_cpus, **self.executor_resources}
        return {k: v for k, v in shape.items() if v > 0}


@dataclass(frozen=True)
class Load:
    steps_in_flight: int
    waiting: int  # step dispatches waiting for an executor
    attempts_in_flight: int  # as the executors last reported them (hedges count)


def wanted_size(load: Load, config: PoolConfig) -> int:
    """Executors needed to keep in-flight work per executor at or under the target."""
    demand = max(load.steps_in_flight + load.waiting, load.attempts_in_flight)
    return min(config.max_executors, max(config.min_executors, math.ceil(demand / config.target_in_flight)))


class Scaler:
    """Grows at once; shrinks only after the pool was over-provisioned for `scale_down_after_s`."""

    def __init__(self, config: PoolConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock
        self._over_since: float | None = None

    def decide(self, load: Load, current: int) -> int:
        want = wanted_size(load, self.config)
        if want >= current:
            self._over_since = None
            return want
        now = self.clock.monotonic()
        if self._over_since is None:
            self._over_since = now
        if now - self._over_since >= self.config.scale_down_after_s:
            self._over_since = None
            return want
        return current


class MemberState(StrEnum):
    STARTING = "starting"  # spawned, not yet answering (maybe pending: no node has room)
    READY = "ready"
    SUSPECT = "suspect"  # a step saw it die or it stopped answering; no new work
    DRAINING = "draining"  # being removed; killed when its last step returns


@dataclass
class _Member:
    key: int
    handle: Any
    state: MemberState
    since: float
    in_flight: int = 0
    served: int = 0  # step dispatches it took
    attempts_in_flight: int = 0
    node_id: str | None = None
    last_seen: float | None = None
    ping: asyncio.Future[Any] | None = None


@dataclass(frozen=True)
class PoolEvent:
    at: float  # monotonic
    kind: str  # grow | shrink | ready | dead | replace
    size: int  # ready + starting after the event
    detail: str = ""


@dataclass(frozen=True)
class PoolStatus:
    ready: int
    starting: int
    suspect: int
    draining: int
    steps_in_flight: int
    waiting: int
    attempts_in_flight: int
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> ready executors there
    served: dict[str, int] = field(default_factory=dict)  # node id -> step dispatches its executors took


class ExecutorPool:
    """Owns StepExecutor actors for one driver. Use `async with ExecutorPool(...) as pool:`."""

    def __init__(
        self,
        providers: Mapping[str, Any],
        config: PoolConfig | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        executor_clock: Clock | None = None,
        executor_kwargs: Mapping[str, Any] | None = None,
        name: str = "executor",
        runtime_env: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config or PoolConfig()
        self.clock = clock
        self.events: deque[PoolEvent] = deque(maxlen=2000)
        self._providers = dict(providers)
        self._executor_clock = executor_clock
        self._executor_kwargs = dict(executor_kwargs or {})  # tail control settings for every executor
        self._runtime_env = dict(runtime_env) if runtime_env else None  # e.g. the user's modules (py_modules)
        self._name = name
        self._members: dict[int, _Member] = {}
        self._keys = itertools.count()
        self._tie = itertools.count()
        self._waiting = 0
        self._changed = asyncio.Event()
        self._scaler = Scaler(self.config, clock)
        self._loop_task: asyncio.Task[None] | None = None
        self._hinted: int | None = None
        self._served: dict[str, int] = {}  # node id -> dispatches, kept after its executors are gone

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> ExecutorPool:
        """Spawn `min_executors` and wait until they answer (bounded), then keep the pool sized."""
        for _ in range(self.config.min_executors):
            self._spawn("start")
        self._hint(self.config.min_executors)
        deadline = Deadline.after(self.config.start_timeout_s, self.clock)
        while not deadline.expired():
            await self._poll_members()
            if self._count(MemberState.READY) >= self.config.min_executors:
                break
            await asyncio.sleep(0.05)
        if self._count(MemberState.READY) == 0:
            await self.close()
            raise NoExecutorError(
                f"no step executor started within {self.config.start_timeout_s:g} s: no node offers "
                f"{self.config.shape()} (add nodes, or let the autoscaler add them)"
            )
        self._loop_task = asyncio.ensure_future(self._control_loop())
        return self

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
            self._loop_task = None
        for member in list(self._members.values()):
            self._kill(member)
        self._members.clear()
        if self._hinted:
            self._hint(0)
        self._publish()

    async def __aenter__(self) -> ExecutorPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what the driver calls -----------------------------------------------------------------

    async def lease(self, deadline: Deadline, avoid: Any = None) -> Lease:
        self._waiting += 1
        try:
            while True:
                member = self._pick(avoid)
                if member is not None:
                    member.in_flight += 1
                    member.served += 1
                    return Lease(member.handle, member.key)
                remaining = deadline.remaining()
                if remaining <= 0:
                    raise NoExecutorError("no step executor was available before the deadline")
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    await wait_first([changed], deadline.earlier(self.config.scale_interval_s))
                finally:
                    changed.cancel()
        finally:
            self._waiting -= 1

    def give_back(self, lease: Lease) -> None:
        member = self._members.get(lease.key)
        if member is None:
            return
        member.in_flight -= 1
        if member.state == MemberState.DRAINING and member.in_flight <= 0:
            self._remove(member, "shrink", "drained")

    def lost(self, lease: Lease) -> bool:
        member = self._members.get(lease.key)
        if member is not None and member.state in (MemberState.READY, MemberState.STARTING):
            member.state, member.since = MemberState.SUSPECT, self.clock.monotonic()
            self._record("dead", "a step saw its executor fail")
        return True

    def status(self) -> PoolStatus:
        nodes: dict[str, int] = {}
        for m in self._members.values():
            if m.state == MemberState.READY and m.node_id:
                nodes[m.node_id] = nodes.get(m.node_id, 0) + 1
            self._flush_served(m)
        return PoolStatus(
            ready=self._count(MemberState.READY),
            starting=self._count(MemberState.STARTING),
            suspect=self._count(MemberState.SUSPECT),
            draining=self._count(MemberState.DRAINING),
            steps_in_flight=sum(m.in_flight for m in self._members.values()),
            waiting=self._waiting,
            attempts_in_flight=sum(m.attempts_in_flight for m in self._members.values()),
            nodes=nodes,
            served=dict(self._served),
        )

    def handles(self) -> list[Any]:
        return [m.handle for m in self._members.values() if m.state == MemberState.READY]

    # -- internals -----------------------------------------------------------------------------

    def _pick(self, avoid: Any) -> _Member | None:
        ready = [m for m in self._members.values() if m.state == MemberState.READY]
        if not ready:
            return None
        # Ties go round: one turn per pick, counted over the ready members (a modulus larger than their
        # number would hand every tie to the first member once the turn passed them all).
        turn = next(self._tie) % len(ready)
        order = {m.key: i for i, m in enumerate(ready)}
        return min(ready, key=lambda m: (m.handle is avoid, m.in_flight, (order[m.key] - turn) % len(ready)))

    def _count(self, state: MemberState) -> int:
        return sum(1 for m in self._members.values() if m.state == state)

    def _spawn(self, reason: str) -> None:
        from tailrace.actors.step_executor import StepExecutor

        key = next(self._keys)
        options: dict[str, Any] = {
            "max_concurrency": 1000,
            "num_cpus": self.config.executor_num_cpus,
            "max_restarts": 0,
        }
        if self.config.executor_resources:
            options["resources"] = dict(self.config.executor_resources)
        if self.config.spread:
            options["scheduling_strategy"] = "SPREAD"
        if self._runtime_env:
            options["runtime_env"] = self._runtime_env
        handle = StepExecutor.options(**options).remote(
            self._providers, f"{self._name}-{key}", self._executor_clock, **self._executor_kwargs
        )
        self._members[key] = _Member(key, handle, MemberState.STARTING, self.clock.monotonic())
        self._record("grow" if reason != "replace" else "replace", reason)

    def _kill(self, member: _Member) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(member.handle, no_restart=True)

    def _flush_served(self, m: _Member) -> None:
        if m.node_id and m.served:
            self._served[m.node_id] = self._served.get(m.node_id, 0) + m.served
            m.served = 0

    def _remove(self, member: _Member, kind: str, detail: str) -> None:
        self._flush_served(member)
        self._members.pop(member.key, None)
        self._kill(member)
        self._record(kind, detail)

    def _record(self, kind: str, detail: str) -> None:
        size = self._count(MemberState.READY) + self._count(MemberState.STARTING)
        self.events.append(PoolEvent(self.clock.monotonic(), kind, size, detail))
        if kind in ("grow", "shrink", "replace"):
            run_metrics.pool_scaled(kind, detail)

    async def _control_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.scale_interval_s)
            await self._poll_members()
            self._resize()
            self._publish()

    async def _poll_members(self) -> None:
        """Settle the health pings that answered, send new ones, and judge the silent members."""
        from ray.exceptions import ActorUnavailableError, RayError

        now = self.clock.monotonic()
        for member in list(self._members.values()):
            if member.ping is not None and member.ping.done():
                ping, member.ping = member.ping, None
                try:
                    info = ping.result()
                except ActorUnavailableError:
                    pass  # maybe a network blip: judged by silence below
                except RayError as exc:  # the actor is gone for good
                    self._remove(member, "dead", type(exc).__name__)
                    continue
                else:
                    self._answered(member, info, now)
            if member.ping is None:
                member.ping = asyncio.wrap_future(member.handle.health.remote().future())
                # Retrieve the exception of a ping nobody awaits, so asyncio does not log it.
                member.ping.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._judge_silence(member, now)

    def _answered(self, member: _Member, info: Mapping[str, Any], now: float) -> None:
        member.last_seen = now
        member.attempts_in_flight = int(info.get("attempts_in_flight", 0))
        member.node_id = info.get("node")
        if member.state in (MemberState.STARTING, MemberState.SUSPECT):
            member.state, member.since = MemberState.READY, now
            self._record("ready", member.node_id or "")
            self._changed.set()

    def _judge_silence(self, member: _Member, now: float) -> None:
        # A starting executor may wait for a node (that is what the autoscaler reacts to): never judged.
        if member.state == MemberState.STARTING or member.last_seen is None:
            return
        silent = now - max(member.last_seen, member.since)
        if member.state == MemberState.READY and silent > self.config.health_timeout_s:
            member.state, member.since = MemberState.SUSPECT, now
            self._record("dead", "stopped answering health checks")
        elif member.state == MemberState.SUSPECT and silent > self.config.replace_after_s:
            self._remove(member, "dead", f"unreachable for {silent:.1f} s")

    def _resize(self) -> None:
        status = self.status()
        load = Load(status.steps_in_flight, status.waiting, status.attempts_in_flight)
        current = status.ready + status.starting
        target = self._scaler.decide(load, current)
        if target > current:
            for _ in range(target - current):
                self._spawn("replace" if current < self.config.min_executors else "backlog")
        elif target < current:
            self._shrink(current - target)
        self._hint(target)

    def _shrink(self, n: int) -> None:
        # Starting executors first (they hold nothing), then the least busy ready ones.
        candidates = sorted(
            (m for m in self._members.values() if m.state in (MemberState.STARTING, MemberState.READY)),
            key=lambda m: (m.state != MemberState.STARTING, m.in_flight),
        )
        for member in candidates[:n]:
            if member.in_flight <= 0:
                self._remove(member, "shrink", "idle")
            else:
                member.state, member.since = MemberState.DRAINING, self.clock.monotonic()
                self._record("shrink", "draining")

    def _hint(self, target: int) -> None:
        """Tell the autoscaler how many executors the pool wants (a persistent request; 0 clears it)."""
        if not self.config.request_resources or target == self._hinted:
            return
        with contextlib.suppress(Exception):  # only a hint: a cluster without an autoscaler ignores it
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[self.config.shape()] * target)
            self._hinted = target

    def _publish(self) -> None:
        s = self.status()
        run_metrics.pool_state(s.ready, s.starting, s.draining, s.suspect, s.steps_in_flight, s.waiting)
