"""Run admission: refuse at submission a run whose tokens cannot arrive before its deadline.

The planner keeps a fluid model of each bucket: admitted runs' needs are served earliest deadline
first at the bucket's rate (less a safety margin), from what is free now. A new run is admitted
when, with it inserted in deadline order, it and every run already admitted still get their tokens
by their latest start (deadline minus the critical path's expected latency) -- the classic EDF
feasibility test, one resource per bucket. It runs in microseconds, so a refusal is immediate.

Under contention it also keeps tenants to their weighted shares: a run of a tenant that is ahead of
its share (by recent admitted bucket-seconds, exponentially decayed) is refused while another
backlogged tenant is behind. When only one tenant is asking, it may use everything.

When a run ends, `done` replaces its planned need with what it actually used, so an over-estimate is
given back and an under-estimate (retries) is charged. `sync` lowers the model to what the real
ledger says is free (provider feedback, another cluster on the same account). Pure; `now` in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass
class _Run:
    run_id: str
    tenant: str
    latest: float
    need: dict[str, float]
    remaining: dict[str, float]
    drained: dict[str, float] = field(default_factory=dict)


@dataclass
class _Bucket:
    capacity: float
    rate_per_s: float
    free: float


class AdmissionPlanner:
    def __init__(
        self,
        buckets: Mapping[str, tuple[float, float]],
        weight: Callable[[str], float],
        now: float,
        *,
        margin: float = 0.05,
        fairness_half_life_s: float = 10.0,
        backlog_window_s: float = 2.0,
    ) -> None:
        self._buckets = {k: _Bucket(cap, rate * (1.0 - margin), cap) for k, (cap, rate) in buckets.items()}
        self._weight = weight
        self._last = now
        self._runs: dict[str, _Run] = {}
        self._served: dict[str, float] = {}  # tenant -> decayed bucket-seconds admitted
        self._asked: dict[str, float] = {}  # tenant -> last time it asked for a servable run
        self._tau = fairness_half_life_s / math.log(2)
        self._backlog_window_s = backlog_window_s

    # ---- the fluid model ---------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        dt = max(0.0, now - self._last)
        if dt <= 0:
            return
        self._last = now
        decay = math.exp(-dt / self._tau)
        for tenant in self._served:
            self._served[tenant] *= decay
        order = sorted(self._runs.values(), key=lambda r: r.latest)
        for key, b in self._buckets.items():
            supply = b.free + dt * b.rate_per_s
            for run in order:
                if supply <= 0:
                    break
                left = run.remaining.get(key, 0.0)
                if left > 0:
                    take = min(left, supply)
                    run.remaining[key] = left - take
                    run.drained[key] = run.drained.get(key, 0.0) + take
                    supply -= take
            b.free = min(b.capacity, supply)

    def _finish_times(self, key: str, queue: list[tuple[float, float]], now: float) -> list[float]:
        b = self._buckets[key]
        out, cum = [], 0.0
        for _, remaining in queue:
            cum += remaining
            short = cum - b.free
            out.append(now if short <= 0 else (now + short / b.rate_per_s if b.rate_per_s > 0 else math.inf))
        return out

    def _size(self, need: Mapping[str, float]) -> float:
        """A run's weight in the fair share: bucket-seconds of its most constrained bucket."""
        return max(
            (need[k] / b.rate_per_s for k, b in self._buckets.items() if need.get(k, 0) > 0 and b.rate_per_s > 0),
            default=0.0,
        )

    # ---- decisions ---------------------------------------------------------------------------

    def admit(self, run_id: str, tenant: str, need: Mapping[str, float], latest: float, now: float) -> str | None:
        """None to admit (and plan) the run, else why it cannot be served in time."""
        self._advance(now)
        need = {k: float(v) for k, v in need.items() if k in self._buckets and v > 0}
        if latest <= now:
            return "the deadline leaves no time to run the workflow's critical path"
        if self._servable(need, latest - now):
            self._asked[tenant] = now  # backlogged: it would fit if the capacity were its own
        contended = False
        for key, amount in need.items():
            b = self._buckets[key]
            if amount > b.capacity and b.rate_per_s <= 0:
                return f"the run needs {amount:,.0f} of {key}, more than its whole allowance {b.capacity:,.0f}"
            queue = sorted(
                [(r.latest, r.remaining.get(key, 0.0)) for r in self._runs.values() if r.remaining.get(key, 0.0) > 0]
            )
            before = self._finish_times(key, queue, now)
            at = sum(1 for due, _ in queue if due <= latest)
            with_new = [*queue[:at], (latest, amount), *queue[at:]]
            after = self._finish_times(key, with_new, now)
            if after[at] > latest:
                return (
                    f"{key}: the run needs {amount:,.0f} before its latest start in {latest - now:.2f} s; "
                    f"with {at} earlier-deadline runs ahead the budget frees it in {after[at] - now:.2f} s"
                )
            for i, (due, _) in enumerate(queue[at:], start=at):
                if before[i] <= due < after[i + 1]:
                    return f"{key}: admitting it would make an admitted run late"
            contended = contended or after[at] > now
        size = self._size(need)
        if contended:
            refusal = self._fair_share(tenant, size, now)
            if refusal is not None:
                return refusal
        self._runs[run_id] = _Run(run_id, tenant, latest, dict(need), dict(need))
        self._served[tenant] = self._served.get(tenant, 0.0) + size
        return None

    def _servable(self, need: Mapping[str, float], slack_s: float) -> bool:
        """Could this run make it if the whole rate were its own? (Else it holds nothing back.)"""
        return all(
            amount <= b.capacity + b.rate_per_s * slack_s for key, amount in need.items() for b in [self._buckets[key]]
        )

    def _fair_share(self, tenant: str, size: float, now: float) -> str | None:
        mine = self._served.get(tenant, 0.0) / self._weight(tenant)
        for other, asked in self._asked.items():
            if other == tenant or now - asked > self._backlog_window_s:
                continue
            theirs = self._served.get(other, 0.0) / self._weight(other)
            if mine > theirs + size / self._weight(tenant):
                return f"fair share: tenant {tenant!r} is ahead of its weighted share while tenant {other!r} is waiting"
        return None

    def done(self, run_id: str, used: Mapping[str, float], now: float) -> None:
        """The run ended: replace what the plan drained for it with what it actually used."""
        self._advance(now)
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        for key, b in self._buckets.items():
            correction = run.drained.get(key, 0.0) - float(used.get(key, 0.0))
            b.free = min(b.capacity, b.free + correction)

    def sync(self, key: str, free: float, now: float) -> None:
        """The real ledger has only `free` left: never plan with more."""
        self._advance(now)
        b = self._buckets.get(key)
        if b is not None:
            b.free = min(b.free, free)

    # ---- introspection -----------------------------------------------------------------------

    def free(self, key: str, now: float) -> float:
        self._advance(now)
        return self._buckets[key].free

    def admitted(self) -> int:
        return len(self._runs)

    def backlog(self, key: str) -> float:
        return sum(r.remaining.get(key, 0.0) for r in self._runs.values())
