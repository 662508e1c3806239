"""Run admission: refuse at submission a run whose tokens cannot arrive in time, and nothing else.

A run is planned as a few *parts*, one per step: the tokens the step is expected to use (learned
from runs that finished), due by the step's latest start (the run's deadline less the time from the
step's start to the run's end, learned the same way; the deadline itself while nothing is learned).
The planner keeps a fluid model of each bucket: admitted parts are served earliest-latest-start first
at the bucket's rate (less a safety margin) from what is free now. A new run is admitted when, with
its parts inserted in that order, each of them and each part already admitted still gets its tokens
by its latest start -- EDF feasibility, one resource per bucket. It runs in microseconds, so a
refusal is immediate, and the refusal names the figures that decided it.

Under contention it also keeps tenants to their weighted shares: a run of a tenant that is ahead of
its share (by recent admitted bucket-seconds, exponentially decayed) is refused while another tenant
is behind and backlogged (had a run refused in the last `backlog_window_s`). A tenant that gets all it
asks for holds nothing back, so when only one tenant is short the other may use everything.

When a run ends, `done` replaces what the plan drained for it with what it actually used, so an
over-estimate is given back and an under-estimate (retries) is charged. `sync` lowers the model to
what the real ledger says is unspent (provider feedback, another cluster on the same account) and
sets aside, for as long as they last, the worst-case holds of attempts in flight. Pure; `now` in
seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Part:
    """Tokens (per bucket) a run needs by `latest`: one step's expected use, due by its latest start."""

    latest: float
    need: Mapping[str, float]
    label: str = ""


@dataclass
class _Run:
    run_id: str
    tenant: str
    parts: list[tuple[float, dict[str, float], str]]  # (latest, remaining per bucket, label)
    drained: dict[str, float] = field(default_factory=dict)

    def remaining(self, key: str) -> float:
        return sum(rem.get(key, 0.0) for _, rem, _ in self.parts)


@dataclass
class _Bucket:
    capacity: float
    rate_per_s: float
    free: float
    held: float = 0.0  # held now by attempts in flight beyond what the plan counted for them (not planned with)


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
        self._backlogged: dict[str, float] = {}  # tenant -> last time a servable run of its was refused
        self._tau = fairness_half_life_s / math.log(2)
        self._backlog_window_s = backlog_window_s

    # ---- the fluid model ---------------------------------------------------------------------

    def _queue(self, key: str) -> list[tuple[float, float, dict[str, float], _Run]]:
        """Admitted parts still owed tokens of `key`, earliest latest start first."""
        out = []
        for run in self._runs.values():
            for latest, remaining, _ in run.parts:
                amount = remaining.get(key, 0.0)
                if amount > 0:
                    out.append((latest, amount, remaining, run))
        out.sort(key=lambda p: p[0])
        return out

    def _advance(self, now: float) -> None:
        dt = max(0.0, now - self._last)
        if dt <= 0:
            return
        self._last = now
        decay = math.exp(-dt / self._tau)
        for tenant in self._served:
            self._served[tenant] *= decay
        for key, b in self._buckets.items():
            supply = b.free + dt * b.rate_per_s
            for _, amount, remaining, run in self._queue(key):
                if supply <= 0:
                    break
                take = min(amount, supply)
                remaining[key] = amount - take
                run.drained[key] = run.drained.get(key, 0.0) + take
                supply -= take
            b.free = min(b.capacity, supply)

    def _finish_times(self, key: str, amounts: Sequence[float], now: float) -> list[float]:
        b = self._buckets[key]
        out, cum = [], 0.0
        for amount in amounts:
            cum += amount
            short = cum - (b.free - b.held)
            out.append(now if short <= 0 else (now + short / b.rate_per_s if b.rate_per_s > 0 else math.inf))
        return out

    def _size(self, need: Mapping[str, float]) -> float:
        """A run's weight in the fair share: bucket-seconds of its most constrained bucket."""
        return max(
            (need[k] / b.rate_per_s for k, b in self._buckets.items() if need.get(k, 0) > 0 and b.rate_per_s > 0),
            default=0.0,
        )

    # ---- decisions ---------------------------------------------------------------------------

    def admit(self, run_id: str, tenant: str, parts: Sequence[Part], now: float) -> str | None:
        """None to admit (and plan) the run, else why its tokens cannot be had in time (with the figures)."""
        self._advance(now)
        mine = [
            (p.latest, {k: float(v) for k, v in p.need.items() if k in self._buckets and v > 0}, p.label) for p in parts
        ]
        total: dict[str, float] = {}
        for _, need, _ in mine:
            for key, amount in need.items():
                total[key] = total.get(key, 0.0) + amount
        size = self._size(total)
        refusal, contended = self._feasible(mine, total, now)
        if refusal is None and contended:
            refusal = self._fair_share(tenant, size, now)
        if refusal is not None:
            if self._servable(total, mine, now):
                self._backlogged[tenant] = now  # it asked for more than it got: its share is held for it
            return refusal
        self._runs[run_id] = _Run(run_id, tenant, [(latest, dict(need), label) for latest, need, label in mine])
        self._served[tenant] = self._served.get(tenant, 0.0) + size
        return None

    def _feasible(
        self, mine: list[tuple[float, dict[str, float], str]], total: Mapping[str, float], now: float
    ) -> tuple[str | None, bool]:
        """(why not, whether the run would wait for tokens): EDF with its parts inserted, every bucket."""
        contended = False
        for key, amount in total.items():
            b = self._buckets[key]
            if amount > b.capacity and b.rate_per_s <= 0:
                return f"{key}: the run needs {amount:,.0f}, more than the whole allowance {b.capacity:,.0f}", False
            queue = [(latest, left, None) for latest, left, _, _ in self._queue(key)]
            new = [(latest, need[key], label) for latest, need, label in mine if need.get(key, 0.0) > 0]
            merged = sorted(queue + new, key=lambda p: (p[0], p[2] is not None))
            before = self._finish_times(key, [a for _, a, _ in queue], now)
            after = self._finish_times(key, [a for _, a, _ in merged], now)
            old_i = 0
            for i, (latest, _, label) in enumerate(merged):
                if label is not None:
                    contended = contended or after[i] > now
                    if after[i] > latest + 1e-9:
                        ahead = sum(a for _, a, lab in merged[:i] if lab is None)
                        return (
                            f"{key}: the run needs {sum(a for _, a, _ in new):,.0f}, "
                            f"{merged[i][1]:,.0f} of it for {label or 'a step'} within {latest - now:.2f} s; "
                            f"with {ahead:,.0f} due earlier for admitted runs and {b.free - b.held:,.0f} free now at "
                            f"{b.rate_per_s:,.1f}/s, it could have it in {after[i] - now:.2f} s"
                        ), True
                else:
                    if before[old_i] <= latest + 1e-9 < after[i]:
                        return f"{key}: admitting it would make an admitted run late (it needs {amount:,.0f})", True
                    old_i += 1
        return None, contended

    def _servable(
        self, total: Mapping[str, float], parts: Sequence[tuple[float, dict[str, float], str]], now: float
    ) -> bool:
        """Could this run make it if the whole rate were its own? (Else it holds nothing back.)"""
        last = max((latest for latest, _, _ in parts), default=now)
        return all(
            amount <= b.capacity + b.rate_per_s * max(0.0, last - now)
            for key, amount in total.items()
            for b in [self._buckets[key]]
        )

    def _fair_share(self, tenant: str, size: float, now: float) -> str | None:
        mine = self._served.get(tenant, 0.0) / self._weight(tenant)
        for other, refused_at in self._backlogged.items():
            if other == tenant or now - refused_at > self._backlog_window_s:
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

    def sync(self, key: str, free: float, now: float, held: float = 0.0) -> None:
        """The real ledger has only `free` left (everything not spent: another cluster on the account or a
        provider's clamp lowers it): never plan with more. `held`: what attempts in flight hold now beyond
        what the plan counted for them (the provider holds their max_tokens until they end): not planned
        with while it is held, and given back when it is not (it is never ratcheted into `free`)."""
        self._advance(now)
        b = self._buckets.get(key)
        if b is not None:
            b.free = min(b.free, free)
            b.held = max(0.0, held)

    # ---- introspection -----------------------------------------------------------------------

    def free(self, key: str, now: float) -> float:
        self._advance(now)
        return self._buckets[key].free

    def admitted(self) -> int:
        return len(self._runs)

    def backlog(self, key: str) -> float:
        return sum(r.remaining(key) for r in self._runs.values())
