"""The executor's side of the budget: reservations served from a lease this process holds.

Every attempt (primary, retry, duplicate) reserves estimated prompt + max_tokens, one request and
its worst-case cost before it is sent, and settles after with what it used. The reservation is a
local subtraction from the lease's balance (microseconds, no actor call); `LeaseReporter` reports
to the ledger and tops the lease up in the background.

When the lease cannot serve everyone, primaries and retries wait in a `FairQueue` until a top-up:
steps of runs under way first, then earliest deadline first -- the order admission planned the runs
in, having kept tenants to their shares already; with admission off, tenants share the queue by
weight instead. A reservation that cannot be granted before its run's deadline, even with the whole
rate, is refused at once. Duplicates never wait: they spend only spare capacity (`speculative_allowed`).

The parts, each readable alone: `LeaseHolding` (the lease and its balances), `Unreported` (what
ended attempts owe the ledger), `DemandEstimate` (how much to ask for), `read_feedback` (429s and
rate-limit headers), `LeaseCounters` (metrics), `LeaseReporter` (the ledger conversation).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from tailrace.engine.clock import SYSTEM_CLOCK, Clock
from tailrace.policies.budget_config import BucketSpec, BudgetConfig, Charges, settled_amount
from tailrace.policies.leases import SpendDelta
from tailrace.policies.priority import SPECULATIVE, FairQueue, Waiter, priority_class, rank, speculative_allowed
from tailrace.policies.spend import Grant, Refusal, SpendAsk, SpendGate, Usage, wasted_tokens
from tailrace.runtime._budget_common import Held, LedgerClient, Today, bucket_label, needs, too_large
from tailrace.runtime.lease_accounts import Unreported
from tailrace.runtime.lease_demand import DemandEstimate
from tailrace.runtime.lease_feedback import read_feedback
from tailrace.runtime.lease_holding import LeaseHolding
from tailrace.runtime.lease_metrics import LeaseCounters
from tailrace.runtime.lease_reporter import LeaseReporter

Specs = tuple[tuple[BucketSpec, Charges], ...]
ADMITTED = "*admitted*"  # the one queue of a pool whose runs passed admission


class LeasePool:
    """One per executor process: holds its lease, serves reservations from it, reports to the ledger."""

    def __init__(
        self, config: BudgetConfig, ledger: LedgerClient, executor_id: str, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.executor_id = executor_id
        self.clock = clock
        self.holding = LeaseHolding()
        self.unreported = Unreported()
        self.demand = DemandEstimate(config.flush_interval_s)
        self.queue = FairQueue(config.weight)
        self.counters = LeaseCounters()
        self.reporter = LeaseReporter(self)
        self._day = Today()
        self._kinds: dict[tuple[str, str], Specs] = {}
        self.in_flight = 0
        self._created = clock.monotonic()
        self.last_use = -math.inf
        self.degraded = False
        self.closed = False

    # ---- the gate ---------------------------------------------------------------------------------

    def gate(self, continuing: bool = False) -> SpendGate:
        """The gate one step's attempts use; `continuing`: its run already has steps done (served first)."""
        from tailrace.runtime.lease_gate import LeaseGate

        return LeaseGate(self, continuing)

    def now(self) -> float:
        return self.clock.monotonic()

    def today(self) -> str:
        return self._day(self.clock.time())

    @property
    def lease_id(self) -> str | None:
        return self.holding.lease_id

    @property
    def balances(self) -> dict[str, float]:
        return self.holding.balances

    def wants(self) -> dict[str, float]:
        return self.demand.wants(self.holding.balances, self.queue.total_needs(), self.reporter.round_trip_s)

    def _take(self, ask: SpendAsk, specs: Specs, need: dict[str, float], now: float) -> Grant:
        self.holding.take(need)
        self.demand.reserved(need)
        for key, amount in need.items():
            self.counters.reserved[bucket_label(key)] += amount
        self.counters.grants += 1
        self.in_flight += 1
        return Grant(ask, Held(specs, need, self.holding.lease_id, now))

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        if self.closed:
            return Refusal("the executor is shutting down: its budget lease was returned")
        now = self.now()
        specs, need = needs(self.config, ask, self.today(), self._kinds)
        if not need:
            return Grant(ask, Held((), {}))
        refusal = too_large(specs, need)
        if refusal:
            self.counters.refused("too_large")
            return Refusal(refusal)
        self.reporter.ensure_running()
        self.last_use = now
        gone = self._ledger_gone(now)
        if gone is not None:
            self.counters.refused("ledger_unreachable")
            return Refusal(gone)
        self.demand.asked(need)
        holding = self.holding
        usable = holding.usable(now)
        if priority_class(ask.role) == SPECULATIVE:
            spare = speculative_allowed(
                need, holding.balances, holding.free_fraction(now), self.config.spare_fraction, len(self.queue) > 0
            )
            if usable and spare and holding.fits(need, now):
                return self._take(ask, specs, need, now)
            self.counters.refused("no_spare_capacity")
            self.reporter.poke()
            return Refusal("no spare capacity for a duplicate near the rate limit")
        if usable and not self.queue and holding.fits(need, now):
            return self._take(ask, specs, need, now)
        deadline = ask.deadline_at
        eta = holding.eta(need, self.queue.needs_ahead(deadline, rank(ask.role, ask.continuing)), now)
        if now + eta > deadline:
            self.counters.refused("never_in_time")
            worst = holding.scarcest(need)
            return Refusal(
                f"budget_exhausted: {need[worst]:,.4g} of {worst} cannot be granted before the run's "
                f"deadline (in {max(0.0, deadline - now):.2f} s; earliest in {eta:.2f} s)"
            )
        return await self._wait(ask, specs, need, deadline, now)

    async def _wait(
        self, ask: SpendAsk, specs: Specs, need: dict[str, float], deadline: float, now: float
    ) -> Grant | Refusal:
        future: asyncio.Future[Grant | Refusal] = asyncio.get_running_loop().create_future()
        size = sum(a for k, a in need.items() if k.startswith(("tokens", "input_tokens", "output_tokens")))
        # With admission on, runs were admitted in deadline order, tenants' shares kept there: serve the plan
        # (earliest deadline first). Without it, tenants share what waits here by weight.
        tenant = ADMITTED if self.config.admission else ask.tenant
        waiter = Waiter(tenant, deadline, need, size or 1.0, (future, ask, specs), rank(ask.role, ask.continuing))
        self.queue.push(waiter)
        self.pump()  # it may go ahead of those waiting (a step of a run under way)
        if future.done():
            return future.result()
        self.counters.waited += 1
        self.reporter.poke()
        timer = asyncio.ensure_future(self.clock.sleep(deadline - now))
        try:
            await asyncio.wait([future, timer], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.queue.remove(waiter)
            if future.done() and not future.cancelled() and isinstance(granted := future.result(), Grant):
                self.release(granted)
            future.cancel()
            raise
        finally:
            timer.cancel()
        if future.done():
            return future.result()
        self.queue.remove(waiter)
        future.cancel()
        self.counters.refused("deadline")
        return Refusal("budget_exhausted: not granted before the run's deadline (the rate limit is saturated)")

    def pump(self) -> None:
        """Serve waiting primaries from the lease, in priority order; stop at the first that does not fit."""
        now = self.now()
        if not self.holding.usable(now):
            return
        while True:
            waiter = self.queue.head()
            if waiter is None or not self.holding.fits(waiter.need, now):
                return
            self.queue.pop()
            future, ask, specs = waiter.payload
            if not future.done():
                future.set_result(self._take(ask, specs, dict(waiter.need), now))

    def _ledger_gone(self, now: float) -> str | None:
        """Why no budget can be had here, once the lease has run out and the ledger stayed silent past
        `ledger_timeout_s` (a restarting or replaced budget actor answers within that)."""
        if self.reporter.failures == 0 or self.holding.usable(now):
            return None
        silent = now - max(self.reporter.last_success, self._created)
        if silent < self.config.ledger_timeout_s:
            return None
        return (
            f"budget_exhausted: no budget can be had: the budget ledger has not answered for {silent:.1f} s "
            f"({self.reporter.last_error})"
        )

    def ledger_unreachable(self) -> None:
        """The reporter could not reach the ledger: once no budget can be had, waiting reservations are
        refused at once rather than at their deadlines."""
        why = self._ledger_gone(self.now())
        if why is None:
            return
        while (waiter := self.queue.pop()) is not None:
            future = waiter.payload[0]
            if not future.done():
                self.counters.refused("ledger_unreachable")
                future.set_result(Refusal(why))

    # ---- settlement -------------------------------------------------------------------------------

    def release(self, grant: Grant) -> None:
        """Undo a grant whose attempt was never sent."""
        held: Held = grant.token  # type: ignore[assignment]
        for key, amount in held.amounts.items():
            self._ended(key, 0.0, amount, held)
        self.in_flight -= 1
        self.pump()

    def _ended(self, key: str, used: float, reserved: float, held: Held) -> None:
        left = self.unreported.ended(key, used, reserved, held.lease_id)
        if left > 1e-12:
            if held.lease_id == self.holding.lease_id and self.holding.usable(self.now()):
                self.holding.balances[key] += left  # it never left this lease
            else:
                self.unreported.unused_elsewhere(held.lease_id, key, left)

    async def settle(self, grant: Grant, used: Usage) -> None:
        held: Held = grant.token  # type: ignore[assignment]
        ask = grant.ask
        if held.specs:
            self.in_flight -= 1
        for spec, charges in held.specs:
            reserved = held.amounts.get(spec.key, 0.0)
            final = settled_amount(spec, charges, ask, used)
            label = bucket_label(spec.key)
            self.counters.used[label] += final
            if used.cancelled and spec.family != "usd":
                self.counters.wasted[label] += final
            if reserved > final:
                self.counters.refunded[label] += reserved - final
            self._ended(spec.key, final, reserved, held)
        # The tenant's spend is the attempt's cost as its record has it: one definition (`attempt_usage`).
        delta = SpendDelta(
            used.cost_usd, used.input_tokens, used.output_tokens, 1, int(used.cancelled), wasted_tokens(used)
        )
        self.unreported.cost(self.today(), ask.tenant, delta)
        self._feedback(held, used)
        self.pump()
        self.reporter.poke()  # there is spend to report now

    def _feedback(self, held: Held, used: Usage) -> None:
        now = self.now()
        feedback = read_feedback(held.specs, used, self.holding.views, now - held.granted_at, now)
        for key, until in feedback.blocked_until.items():
            self.holding.block(key, until)
        self.unreported.feedback.update(feedback.report)
        if feedback.report:
            self.reporter.poke()

    # ---- lifecycle --------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Return the lease and report what is left (executor shutdown)."""
        self.closed = True
        await self.reporter.stop()
        self.last_use = -math.inf
        await self.reporter.final_reports()

    def snapshot(self) -> dict[str, Any]:
        return {
            "lease_id": self.holding.lease_id,
            "balances": {k: v for k, v in self.holding.balances.items() if v},
            "waiting": len(self.queue),
            "degraded": self.degraded,
            "failures": self.reporter.failures,
            "last_error": self.reporter.last_error,
        }
