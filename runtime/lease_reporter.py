"""The lease pool's conversation with the ledger: one background task per executor.

Every `flush_interval_s` while the executor is active (a quarter of that while reservations wait)
it sends one `exchange`: spend of ended attempts, unused reservations, refunds, debts, provider
feedback, tenants' costs, and what the lease wants for the next few periods; the reply renews the
lease and brings grants. A report that got no answer is sent again as it was (the ledger answers a
repeated report id from its memory, never applying it twice). A lease stays open while attempts it
granted are in flight; an idle executor closes it. An unreachable ledger is retried with back-off;
the lease is spent meanwhile until it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import uuid
from typing import TYPE_CHECKING

from tailrace.policies.leases import BucketOp, ExchangeRequest
from tailrace.runtime.budget_ledger import LedgerUnavailable

if TYPE_CHECKING:
    from tailrace.runtime.lease_pool import LeasePool

log = logging.getLogger("tailrace.budget")

RETURN_ABOVE_TARGET = 1.5  # return what is held beyond this multiple of the fair holding
MAX_BACKOFF_S = 0.5


class LeaseReporter:
    def __init__(self, pool: LeasePool) -> None:
        self._pool = pool
        self._boot = uuid.uuid4().hex[:8]
        self._seq = itertools.count(1)
        self._pending: ExchangeRequest | None = None  # sent, not acknowledged: resent as is
        self.last_exchange = -math.inf
        self.last_success = -math.inf
        self.round_trip_s = 0.0  # smoothed time an exchange takes (the lease holds enough to cover two)
        self.failures = 0  # consecutive
        self.last_error = ""
        self.loop_errors = 0  # unexpected exceptions in the loop (logged)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- the task ---------------------------------------------------------------------------------

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def _due(self, now: float) -> float:
        pool, config = self._pool, self._pool.config
        if self._pending is not None or pool.unreported.feedback:
            return now
        flush = config.flush_interval_s
        if pool.queue:
            return max(now, self.last_exchange + flush / 4)
        # A lease stays open while attempts it granted are in flight: closing it would write their
        # tokens off as spent now, possibly before the provider has charged them.
        active = now - pool.last_use < config.idle_release_s or pool.in_flight > 0
        holding = pool.holding
        if not active:
            return now if (holding.lease_id is not None or pool.unreported.any()) else math.inf
        due = holding.expires - config.lease_ttl_s / 2 if holding.lease_id is not None else now
        if pool.unreported.any() or any(w > 0 for w in pool.wants().values()):
            due = min(due, self.last_exchange + flush)
        return max(now, due)

    async def _run(self) -> None:
        pool = self._pool
        backoff = 0.0
        while not pool.closed:
            now = pool.now()
            pool.holding.forget_if_expired(now)
            due = self._due(now)
            if due > now:
                await self._sleep_until_woken(min(due - now, 3600.0))
                continue
            try:
                await self.exchange()
                backoff = 0.0
            except LedgerUnavailable as exc:
                self._failed(str(exc))
                backoff = min(MAX_BACKOFF_S, max(0.02, backoff * 2))
                pool.ledger_unreachable()
                await pool.clock.sleep(backoff)
            except Exception as exc:  # a bug must not silently stop this executor's budget: log, back off, go on
                self.loop_errors += 1
                log.exception("budget lease loop error")
                self._failed(f"internal error: {type(exc).__name__}")
                backoff = min(MAX_BACKOFF_S, max(0.02, backoff * 2))
                await pool.clock.sleep(backoff)

    def _failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why

    async def _sleep_until_woken(self, seconds: float) -> None:
        assert self._wake is not None
        self._wake.clear()
        waker = asyncio.ensure_future(self._wake.wait())
        timer = asyncio.ensure_future(self._pool.clock.sleep(seconds))
        try:
            await asyncio.wait([waker, timer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()
            timer.cancel()

    # ---- one report ---------------------------------------------------------------------------------

    def _build(self, now: float) -> ExchangeRequest:
        pool, config, holding, unreported = self._pool, self._pool.config, self._pool.holding, self._pool.unreported
        elapsed = max(1e-3, now - self.last_exchange) if self.last_exchange > -math.inf else 1.0
        pool.demand.report(elapsed)
        close = not pool.queue and pool.in_flight <= 0 and now - pool.last_use >= config.idle_release_s
        usable = holding.usable(now)
        wants = {} if close else pool.wants()
        spent, own_unused, refunds = unreported.take_lease(holding.lease_id)
        debits = unreported.take_debits()
        ops: dict[str, BucketOp] = {}
        keys = set(holding.balances) | set(spent) | set(own_unused) | set(refunds) | set(debits) | set(wants)
        for key in keys:
            ret = own_unused.get(key, 0.0)  # unused, under this lease, while it was not usable here
            if usable and close:
                ret += holding.balances[key]
                holding.balances[key] = 0.0
            elif usable:
                excess = holding.excess(key, RETURN_ABOVE_TARGET)
                ret += excess
                holding.balances[key] -= excess
            ops[key] = BucketOp(
                want=wants.get(key, 0.0),
                ret=ret,
                spent=spent.get(key, 0.0),
                refund=refunds.get(key, 0.0),
                debit=debits.get(key, 0.0),
            )
        day, spend = unreported.take_one_day(pool.today())
        return ExchangeRequest(
            executor=pool.executor_id,
            report_id=f"{pool.executor_id}-{self._boot}-{next(self._seq)}",
            lease_id=holding.lease_id,
            ops=ops,
            feedback=unreported.take_feedback(),
            spend=spend,
            day=day,
            ttl_s=config.lease_ttl_s,
            close=close,
            balances={k: v for k, v in holding.balances.items() if v > 0},
        )

    async def exchange(self) -> None:
        pool = self._pool
        now = pool.now()
        if self._pending is None:
            self._pending = self._build(now)
        req = self._pending
        try:
            reply = await pool.ledger.exchange(req)
        finally:
            self.last_exchange = now
        self._pending = None
        self.failures, self.last_error = 0, ""
        self.last_success = pool.now()
        self.round_trip_s = 0.8 * self.round_trip_s + 0.2 * min(5.0, max(0.0, self.last_success - now))
        pool.degraded = reply.degraded
        if req.lease_id is not None and (reply.lost or req.close):
            pool.unreported.written_off(req.lease_id)
        if reply.lost and req.lease_id is not None:
            pool.counters.leases_lost += 1
        pool.holding.absorb(reply, closed=req.close, sent_at=now, now=pool.now())
        pool.pump()
        pool.counters.flush_safely(pool.executor_id, len(pool.queue))

    async def final_reports(self) -> None:
        """Executor shutdown: report what is left and return the lease (at most two exchanges)."""
        pool = self._pool
        if self._pending is not None or pool.holding.lease_id is not None or pool.unreported.any():
            try:
                await self.exchange()
                if pool.holding.lease_id is not None or pool.unreported.any():
                    await self.exchange()
            except LedgerUnavailable as exc:
                log.warning("budget: could not return the lease at shutdown (%s); it will expire", exc)
