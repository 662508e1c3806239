"""The executor's side of the budget: a lease spent locally (`LeasePool`) and the gates built on it.

Every attempt (primary, retry, duplicate) reserves estimated prompt + max_tokens, one request and
its worst-case cost before it is sent, and settles after with what it used. In lease mode the
reservation is a local subtraction from what this executor's lease holds (microseconds, no actor
call); a background task reports spend to the ledger, returns what is not needed, and tops the
lease up ahead of need, every `flush_interval_s` while active. Idle executors return their lease.

Priority when the lease cannot serve everyone: primaries and retries wait in a `FairQueue`
(tenants' weighted fair share, earliest deadline first within a tenant) until a top-up; a
reservation that cannot be granted before its run's deadline, even with the whole rate, is refused
at once. Duplicates never wait: they spend only spare capacity (`speculative_allowed`).

Held tokens are reported spent only when their attempt ends: until then the provider may not have
charged them yet (a request can sit in an event loop or a connection pool for a while), and the
ledger must not start refilling for tokens the provider has not taken -- its bucket may be full and
refilling nothing meanwhile. What an attempt did not use goes back to the lease (or, if that lease
is gone, back to the ledger as a refund once the ledger has written the lease off).

Provider feedback travels back with the next report: a 429 blocks the bucket for its Retry-After
(here at once, at the ledger for everyone), and rate-limit headers that show fewer tokens left than
the ledger believes (another client on the key) lower the ledger to the provider's figure.

`tailrace.runtime.direct_gate` has the one-actor-call-per-attempt alternative (`BudgetConfig.mode="direct"`)
and `ComposedGate`, which puts the run's cost cap in front of either.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any

from tailrace.engine.clock import SYSTEM_CLOCK, Clock
from tailrace.policies.budget_config import BucketSpec, BudgetConfig, Charges, settled_amount, usage_unknown
from tailrace.policies.leases import BucketOp, BucketView, ExchangeRequest, ProviderFeedback, SpendDelta, SpendTotals
from tailrace.policies.priority import SPECULATIVE, FairQueue, Waiter, priority_class, speculative_allowed
from tailrace.policies.spend import Grant, Refusal, SpendAsk, SpendGate, Usage
from tailrace.runtime import metrics
from tailrace.runtime._budget_common import Held, LedgerClient, LocalLedgerClient, Today, bucket_label, needs, too_large
from tailrace.runtime.budget_ledger import LedgerUnavailable

__all__ = ["LeaseGate", "LeasePool", "LedgerClient", "LocalLedgerClient"]

log = logging.getLogger("tailrace.budget")

HORIZON_PERIODS = 4  # a lease aims to hold this many report periods of demand
RETURN_ABOVE_TARGET = 1.5  # return what is held beyond this multiple of the fair holding

_REMAINING_HEADERS = {
    "tokens": ("x-ratelimit-remaining-tokens", "anthropic-ratelimit-tokens-remaining"),
    "requests": ("x-ratelimit-remaining-requests", "anthropic-ratelimit-requests-remaining"),
    "input_tokens": ("anthropic-ratelimit-input-tokens-remaining",),
    "output_tokens": ("anthropic-ratelimit-output-tokens-remaining",),
}


@dataclass
class _Counters:
    """Metrics accumulated locally and pushed with each report (never per attempt: too slow)."""

    reserved: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    used: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    refunded: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    wasted: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    refusals: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    grants: int = 0
    waited: int = 0
    leases_lost: int = 0

    def flush(self) -> None:
        for name, values, help_ in (
            ("tailrace_budget_reserved_total", self.reserved, "Amount reserved before attempts, per bucket"),
            ("tailrace_budget_used_total", self.used, "Amount attempts finally cost, per bucket"),
            ("tailrace_budget_refunded_total", self.refunded, "Reserved but not charged, given back, per bucket"),
            ("tailrace_budget_wasted_total", self.wasted, "Amount charged by attempts that were cancelled"),
        ):
            for key, v in values.items():
                metrics.count(name, help_, {"bucket": key}, v)
            values.clear()
        for reason, n in self.refusals.items():
            metrics.count("tailrace_budget_refusals_total", "Reservations refused, by reason", {"reason": reason}, n)
        self.refusals.clear()
        metrics.count("tailrace_budget_grants_total", "Reservations granted", {}, self.grants)
        metrics.count("tailrace_budget_waits_total", "Reservations that waited for a top-up", {}, self.waited)
        metrics.count("tailrace_budget_leases_lost_total", "Leases found expired at the ledger", {}, self.leases_lost)
        self.grants = self.waited = self.leases_lost = 0


class LeasePool:
    """One per executor process: holds its lease, serves reservations from it, reports to the ledger."""

    def __init__(
        self, config: BudgetConfig, ledger: LedgerClient, executor_id: str, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.config = config
        self._ledger = ledger
        self._id = executor_id
        self._boot = uuid.uuid4().hex[:8]
        self._clock = clock
        self._kinds: dict[tuple[str, str], tuple[tuple[BucketSpec, Charges], ...]] = {}
        self.lease_id: str | None = None
        self.balances: defaultdict[str, float] = defaultdict(float)
        self._expires = -math.inf
        self._views: dict[str, BucketView] = {}
        self._views_at = -math.inf
        self._targets: dict[str, float] = {}
        self._queue = FairQueue(config.weight)
        self._seq = itertools.count(1)
        # Not yet reported, per lease: held amounts that ended attempts used, and what they did not use
        # but could not give back to a live lease. Plus debits, spend per tenant, provider feedback.
        self._spent: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._leftover: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._dead: OrderedDict[str, None] = OrderedDict()  # leases the ledger wrote off (lost or closed)
        self._debits: defaultdict[str, float] = defaultdict(float)
        self._in_flight = 0
        self._spend: dict[tuple[str, str], SpendTotals] = {}
        self._today = Today()
        self._feedback: dict[str, ProviderFeedback] = {}
        self._pending: ExchangeRequest | None = None  # sent, not acknowledged: resent as is
        self._demand: defaultdict[str, float] = defaultdict(float)  # units/s, smoothed
        self._reserved_since: defaultdict[str, float] = defaultdict(float)
        self._largest: defaultdict[str, float] = defaultdict(float)  # largest recent single need
        self._local_block: dict[str, float] = {}
        self._last_use = -math.inf
        self._last_exchange = -math.inf
        self._failures = 0
        self.degraded = False
        self.counters = _Counters()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ---- the gate ---------------------------------------------------------------------------------

    def gate(self) -> SpendGate:
        return LeaseGate(self)

    def _now(self) -> float:
        return self._clock.monotonic()

    def _usable(self, now: float) -> bool:
        return self.lease_id is not None and now < self._expires

    def _fits(self, need: dict[str, float], now: float) -> bool:
        return all(self.balances[k] + 1e-9 >= a and self._local_block.get(k, -math.inf) <= now for k, a in need.items())

    def _free_fraction(self, now: float) -> dict[str, float]:
        out = {}
        for key, view in self._views.items():
            refilled = view.level + view.rate_per_s * max(0.0, now - self._views_at)
            out[key] = min(max(0.0, refilled), view.capacity - view.outstanding) / view.capacity
        return out

    def _take(
        self, ask: SpendAsk, specs: tuple[tuple[BucketSpec, Charges], ...], need: dict[str, float], now: float
    ) -> Grant:
        for key, amount in need.items():
            self.balances[key] -= amount
            self._reserved_since[key] += amount
            self.counters.reserved[bucket_label(key)] += amount
        self.counters.grants += 1
        self._in_flight += 1
        return Grant(ask, Held(specs, need, self.lease_id, now))

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        if self._closed:
            return Refusal("the executor is shutting down: its budget lease was returned")
        now = self._now()
        specs, need = needs(self.config, ask, self._today(self._clock.time()), self._kinds)
        if not need:
            return Grant(ask, Held((), {}))
        refusal = too_large(specs, need)
        if refusal:
            self.counters.refusals["too_large"] += 1
            return Refusal(refusal)
        self._ensure_running()
        self._last_use = now
        for key, amount in need.items():
            self._largest[key] = max(self._largest[key] * 0.99, amount)
        usable = self._usable(now)
        if priority_class(ask.role) == SPECULATIVE:
            if (
                usable
                and speculative_allowed(
                    need, self.balances, self._free_fraction(now), self.config.spare_fraction, len(self._queue) > 0
                )
                and self._fits(need, now)
            ):
                return self._take(ask, specs, need, now)
            self.counters.refusals["no_spare_capacity"] += 1
            self._poke()
            return Refusal("no spare capacity for a duplicate near the rate limit")
        if usable and not self._queue and self._fits(need, now):
            return self._take(ask, specs, need, now)
        deadline = ask.deadline_at
        eta = self._eta(need, deadline, now)
        if now + eta > deadline:
            self.counters.refusals["never_in_time"] += 1
            worst = max(need, key=lambda k: need[k] / max(self._views[k].rate_per_s, 1e-9) if k in self._views else 0)
            return Refusal(
                f"budget_exhausted: {need[worst]:,.4g} of {worst} cannot be granted before the run's "
                f"deadline (in {max(0.0, deadline - now):.2f} s; earliest in {eta:.2f} s)"
            )
        return await self._wait(ask, specs, need, deadline, now)

    async def _wait(
        self,
        ask: SpendAsk,
        specs: tuple[tuple[BucketSpec, Charges], ...],
        need: dict[str, float],
        deadline: float,
        now: float,
    ) -> Grant | Refusal:
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        size = sum(a for k, a in need.items() if k.startswith(("tokens", "input_tokens", "output_tokens")))
        waiter = Waiter(ask.tenant, deadline, need, size or 1.0, (future, ask, specs))
        self._queue.push(waiter)
        self.counters.waited += 1
        self._poke()
        timer = asyncio.ensure_future(self._clock.sleep(deadline - now))
        try:
            await asyncio.wait([future, timer], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._queue.remove(waiter)
            if future.done() and not future.cancelled():
                self.release(future.result())
            future.cancel()
            raise
        finally:
            timer.cancel()
        if future.done():
            return future.result()
        self._queue.remove(waiter)
        future.cancel()
        self.counters.refusals["deadline"] += 1
        return Refusal("budget_exhausted: not granted before the run's deadline (the rate limit is saturated)")

    def _eta(self, need: dict[str, float], deadline: float, now: float) -> float:
        """A lower bound on when `need` could be granted: what waits ahead of it, less what this lease
        and the whole ledger have free, at the bucket's full rate."""
        ahead = self._queue.needs_ahead(deadline)
        since = max(0.0, now - self._views_at)
        worst = 0.0
        for key, amount in need.items():
            wait = self._local_block.get(key, -math.inf) - now
            view = self._views.get(key)
            if view is not None:
                wait = max(wait, view.blocked_s - since)
                free = min(view.capacity - view.outstanding, max(0.0, view.level + view.rate_per_s * since))
                short = ahead.get(key, 0.0) + amount - self.balances[key] - free
                if short > 0:
                    wait = max(wait, short / view.rate_per_s if view.rate_per_s > 0 else math.inf)
            worst = max(worst, wait)
        return worst

    def release(self, grant: Grant) -> None:
        """Undo a grant whose attempt was never sent."""
        held: Held = grant.token  # type: ignore[assignment]
        for key, amount in held.amounts.items():
            self._end(key, 0.0, amount, held)
        self._in_flight -= 1
        self._pump()

    def _end(self, key: str, used: float, reserved: float, held: Held) -> None:
        """An attempt ended: `used` of its `reserved` was charged by the provider."""
        lease = held.lease_id or ""
        self._spent[lease][key] += min(used, reserved)
        if used > reserved:
            self._debits[key] += used - reserved
        left = reserved - used
        if left > 1e-12:
            if held.lease_id == self.lease_id and self._usable(self._now()):
                self.balances[key] += left  # it never left this lease
            else:
                self._leftover[lease][key] += left

    async def settle(self, grant: Grant, used: Usage) -> None:
        held: Held = grant.token  # type: ignore[assignment]
        ask = grant.ask
        unknown = usage_unknown(used)
        if held.specs:
            self._in_flight -= 1
        for spec, charges in held.specs:
            reserved = held.amounts.get(spec.key, 0.0)
            final = settled_amount(spec, charges, ask, used)
            label = bucket_label(spec.key)
            self.counters.used[label] += final
            if used.cancelled and spec.family != "usd":
                self.counters.wasted[label] += final
            if reserved > final:
                self.counters.refunded[label] += reserved - final
            self._end(spec.key, final, reserved, held)
        usd = ask.cost_usd if unknown else used.cost_usd
        wasted = (
            int(sum(held.amounts.get(s.key, 0.0) for s, _ in held.specs if s.family == "tokens"))
            if used.cancelled
            else 0
        )
        key = (self._today(self._clock.time()), ask.tenant)
        totals = self._spend.get(key)
        if totals is None:
            totals = self._spend[key] = SpendTotals()
        totals.usd += usd
        totals.input_tokens += used.input_tokens
        totals.output_tokens += used.output_tokens
        totals.attempts += 1
        totals.cancelled += int(used.cancelled)
        totals.wasted_tokens += wasted
        self._provider_feedback(held, used)
        self._pump()
        self._poke()  # there is spend to report now

    def _provider_feedback(self, held: Held, used: Usage) -> None:
        if used.status != 429 and not used.rate_limit:
            return
        now = self._now()
        headers = {k.lower(): v for k, v in used.rate_limit.items()}
        age = max(0.0, now - held.granted_at)
        for spec, _ in held.specs:
            if spec.family == "usd":
                continue
            if used.status == 429:
                blocked = used.retry_after_s if used.retry_after_s is not None else 1.0
                self._local_block[spec.key] = max(self._local_block.get(spec.key, -math.inf), now + blocked)
                self._feedback[spec.key] = ProviderFeedback(blocked_s=blocked)
                continue
            remaining = next((headers[h] for h in _REMAINING_HEADERS.get(spec.family, ()) if h in headers), None)
            view = self._views.get(spec.key)
            if remaining is None or view is None:
                continue
            try:
                said = float(remaining)
            except ValueError:
                continue
            # The header is as old as the attempt: the provider has refilled since.
            aged = said + spec.rate_per_s * age
            if aged < view.level - 0.01 * spec.capacity:
                self._feedback[spec.key] = ProviderFeedback(remaining=aged)
        if self._feedback:
            self._poke()

    def _pump(self) -> None:
        """Serve waiting primaries from the lease, in priority order; stop at the first that does not fit."""
        now = self._now()
        if not self._usable(now):
            return
        while True:
            waiter = self._queue.head()
            if waiter is None or not self._fits(dict(waiter.need), now):
                return
            self._queue.pop()
            future, ask, specs = waiter.payload
            if not future.done():
                future.set_result(self._take(ask, specs, dict(waiter.need), now))

    # ---- talking to the ledger --------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _unreported(self) -> bool:
        return bool(
            self._spend
            or self._feedback
            or any(any(v.values()) for v in self._spent.values())
            or any(any(v.values()) for v in self._leftover.values())
            or any(self._debits.values())
        )

    def _due(self, now: float) -> float:
        if self._pending is not None or self._feedback:
            return now
        flush = self.config.flush_interval_s
        if self._queue:
            return max(now, self._last_exchange + flush / 4)
        # A lease stays open while attempts it granted are in flight: closing it would write their
        # tokens off as spent now, possibly before the provider has charged them.
        active = now - self._last_use < self.config.idle_release_s or self._in_flight > 0
        if not active:
            return now if (self.lease_id is not None or self._unreported()) else math.inf
        due = self._expires - self.config.lease_ttl_s / 2 if self.lease_id is not None else now
        if self._unreported() or any(w > 0 for w in self._wants(now).values()):
            due = min(due, self._last_exchange + flush)
        return max(now, due)

    async def _run(self) -> None:
        backoff = 0.0
        while not self._closed:
            now = self._now()
            if self.lease_id is not None and not self._usable(now) and any(self.balances.values()):
                self.balances.clear()  # expired here: the ledger writes it off; never spend it late
            due = self._due(now)
            if due > now:
                assert self._wake is not None
                self._wake.clear()
                waker = asyncio.ensure_future(self._wake.wait())
                timer = asyncio.ensure_future(self._clock.sleep(min(due - now, 3600.0)))
                try:
                    await asyncio.wait([waker, timer], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waker.cancel()
                    timer.cancel()
                continue
            try:
                await self._exchange()
                backoff = 0.0
                self._failures = 0
            except LedgerUnavailable:
                self._failures += 1
                backoff = min(0.5, max(0.02, backoff * 2))
                await self._clock.sleep(backoff)
            except Exception:  # a bug must not silently stop this executor's budget: log, back off, go on
                log.exception("budget lease loop error")
                self._failures += 1
                backoff = min(0.5, max(0.02, backoff * 2))
                await self._clock.sleep(backoff)

    def _wants(self, now: float) -> dict[str, float]:
        horizon = self.config.flush_interval_s * HORIZON_PERIODS
        queued = self._queue.total_needs()
        wants = {}
        for key in set(self._demand) | set(queued) | set(self._largest):
            want = max(self._demand[key] * horizon, self._largest[key]) + queued.get(key, 0.0) - self.balances[key]
            wants[key] = max(0.0, want)
        return wants

    def _build(self, now: float) -> ExchangeRequest:
        dt = max(1e-3, now - self._last_exchange) if self._last_exchange > -math.inf else 1.0
        for key, amount in self._reserved_since.items():
            self._demand[key] = 0.5 * self._demand[key] + 0.5 * amount / dt
        self._reserved_since.clear()
        close = not self._queue and self._in_flight <= 0 and now - self._last_use >= self.config.idle_release_s
        usable = self._usable(now)
        lease = self.lease_id or ""
        wants = {} if close else self._wants(now)
        spent = self._spent.pop(lease, {})
        own_leftover = self._leftover.pop(lease, {})
        refunds: defaultdict[str, float] = defaultdict(float)
        for dead in [x for x in self._leftover if x in self._dead or x == ""]:
            for key, amount in self._leftover.pop(dead).items():
                refunds[key] += amount  # that lease was written off: these tokens are free again
        for dead in [x for x in self._spent if x in self._dead or x == ""]:
            del self._spent[dead]  # written off with its lease already
        ops: dict[str, BucketOp] = {}
        keys = set(self.balances) | set(spent) | set(own_leftover) | set(refunds) | set(self._debits) | set(wants)
        for key in keys:
            ret = own_leftover.get(key, 0.0)  # unused, under this lease, while it was not usable here
            if usable and close:
                ret += self.balances[key]
                self.balances[key] = 0.0
            elif usable and key in self._targets and self.balances[key] > self._targets[key] * RETURN_ABOVE_TARGET:
                ret += self.balances[key] - self._targets[key]
                self.balances[key] = self._targets[key]
            ops[key] = BucketOp(
                want=wants.get(key, 0.0),
                ret=ret,
                spent=spent.get(key, 0.0),
                refund=refunds.get(key, 0.0),
                debit=self._debits.get(key, 0.0),
            )
        # One day per report, the oldest first (spend is recorded per UTC day).
        days = sorted({d for d, _ in self._spend})
        day = days[0] if days else self._today(self._clock.time())
        spend = {t: SpendDelta(**vars(self._spend.pop((d, t)))) for d, t in list(self._spend) if d == day}
        req = ExchangeRequest(
            executor=self._id,
            report_id=f"{self._id}-{self._boot}-{next(self._seq)}",
            lease_id=self.lease_id,
            ops=ops,
            feedback=dict(self._feedback),
            spend=spend,
            day=day,
            ttl_s=self.config.lease_ttl_s,
            close=close,
            balances={k: v for k, v in self.balances.items() if v > 0},
        )
        self._debits.clear()
        self._feedback.clear()
        return req

    async def _exchange(self) -> None:
        now = self._now()
        if self._pending is None:
            self._pending = self._build(now)
        req = self._pending
        sent_at = now
        try:
            reply = await self._ledger.exchange(req)
        finally:
            self._last_exchange = sent_at
        self._pending = None
        self.degraded = reply.degraded
        self._views, self._views_at, self._targets = dict(reply.buckets), self._now(), dict(reply.targets)
        if req.lease_id is not None and (reply.lost or req.close):
            self._dead[req.lease_id] = None  # written off by the ledger
            while len(self._dead) > 256:
                self._dead.popitem(last=False)
        if reply.lost and req.lease_id is not None:
            self.counters.leases_lost += 1
        if req.close:
            self.lease_id, self._expires = None, -math.inf
            self.balances.clear()
        else:
            if reply.lost or reply.lease_id != self.lease_id:
                # Whatever was held under the old lease is the ledger's to write off.
                self.balances.clear()
            self.lease_id = reply.lease_id
            margin = max(0.05, 0.1 * reply.ttl_s)
            self._expires = sent_at + reply.ttl_s - margin
            for key, amount in reply.granted.items():
                self.balances[key] += amount
        self._pump()
        with contextlib.suppress(Exception):  # metrics are never worth a lost report
            self.counters.flush()
            metrics.gauge(
                "tailrace_budget_waiting",
                "Reservations waiting for budget in this executor",
                {"executor": self._id},
                len(self._queue),
            )

    async def aclose(self) -> None:
        """Return the lease and report what is left (executor shutdown)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._last_use = -math.inf
        if self._pending is not None or self.lease_id is not None or self._unreported():
            with contextlib.suppress(LedgerUnavailable):
                await self._exchange()
                if self.lease_id is not None or self._unreported():
                    await self._exchange()

    def snapshot(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "balances": {k: v for k, v in self.balances.items() if v},
            "waiting": len(self._queue),
            "degraded": self.degraded,
            "failures": self._failures,
        }


class LeaseGate:
    """The `SpendGate` an executor's step runner uses: reservations served from the executor's lease."""

    def __init__(self, pool: LeasePool) -> None:
        self._pool = pool

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        return await self._pool.reserve(ask)

    async def settle(self, grant: Grant, used: Usage) -> None:
        await self._pool.settle(grant, used)

    def release(self, grant: Grant) -> None:
        self._pool.release(grant)
