"""Two more executor-side budget gates: one ledger call per attempt (`DirectGate`), and gates in a row
(`ComposedGate`: the run's cost cap, then the cluster budget).

`DirectGate` is what leases are measured against (`benchmarks/reservations.py`), and the simplest
thing that is correct for a tiny deployment: it reserves exactly an attempt's need with an
all-or-nothing exchange and settles it in another, polling the ledger's estimate while it waits.
It has no local priority queue: duplicates are refused unless every bucket has spare capacity.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Sequence
from typing import Any

from tailrace.engine.clock import SYSTEM_CLOCK, Clock, Deadline
from tailrace.policies.budget_config import BucketSpec, BudgetConfig, Charges, settled_amount, utc_day
from tailrace.policies.leases import BucketOp, ExchangeReply, ExchangeRequest, SpendDelta
from tailrace.policies.priority import SPECULATIVE, priority_class
from tailrace.policies.spend import Grant, Refusal, SpendAsk, SpendGate, Usage, wasted_tokens
from tailrace.runtime._budget_common import Held, LedgerClient, needs, too_large
from tailrace.runtime.budget_ledger import LedgerUnavailable


class DirectGate:
    """One ledger call per reservation and one per settlement: the baseline leases are measured
    against. Waits by polling the ledger's estimate; no local priority queue."""

    def __init__(
        self, config: BudgetConfig, ledger: LedgerClient, executor_id: str, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.config = config
        self._ledger = ledger
        self._id = executor_id
        self._clock = clock
        self._kinds: dict[tuple[str, str], tuple[tuple[BucketSpec, Charges], ...]] = {}

    def gate(self, continuing: bool = False) -> SpendGate:
        return self  # one call per attempt: no local queue to order

    async def aclose(self) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"mode": "direct"}

    async def _call(self, req: ExchangeRequest) -> ExchangeReply:
        for attempt in range(20):
            try:
                return await self._ledger.exchange(req)
            except LedgerUnavailable:
                await self._clock.sleep(min(0.5, 0.02 * 2**attempt))
        raise LedgerUnavailable("the budget ledger did not answer")

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        specs, need = needs(self.config, ask, utc_day(self._clock.time()), self._kinds)
        if not need:
            return Grant(ask, Held((), {}))
        refusal = too_large(specs, need)
        if refusal:
            return Refusal(refusal)
        deadline = Deadline(ask.deadline_at, self._clock)
        ttl = max(self.config.lease_ttl_s, deadline.remaining() + 5.0)
        lease_id = None
        while True:
            try:
                reply = await self._call(
                    ExchangeRequest(
                        executor=self._id,
                        report_id=uuid.uuid4().hex,
                        lease_id=lease_id,
                        exact=True,
                        ttl_s=ttl,
                        ops={k: BucketOp(want=a) for k, a in need.items()},
                    )
                )
            except LedgerUnavailable:
                return Refusal("budget_exhausted: the budget ledger is unreachable")
            lease_id = reply.lease_id
            if reply.granted:
                return Grant(ask, Held(specs, need, lease_id, self._clock.monotonic()))
            spare = all(v.free_fraction >= self.config.spare_fraction for v in reply.buckets.values())
            eta = max((v.seconds_until(need[k]) for k, v in reply.buckets.items()), default=0.0)
            if priority_class(ask.role) == SPECULATIVE and not spare:
                eta = math.inf
            if eta > deadline.remaining():
                with contextlib.suppress(LedgerUnavailable):
                    await self._call(
                        ExchangeRequest(executor=self._id, report_id=uuid.uuid4().hex, lease_id=lease_id, close=True)
                    )
                return Refusal("budget_exhausted: cannot be granted before the run's deadline")
            await self._clock.sleep(min(max(eta, 0.005), deadline.remaining()))

    async def settle(self, grant: Grant, used: Usage) -> None:
        held: Held = grant.token  # type: ignore[assignment]
        ask = grant.ask
        ops = {}
        for spec, charges in held.specs:
            reserved, final = held.amounts[spec.key], settled_amount(spec, charges, ask, used)
            ops[spec.key] = BucketOp(
                spent=min(reserved, final), ret=max(0.0, reserved - final), debit=max(0.0, final - reserved)
            )
        spend = {
            ask.tenant: SpendDelta(
                used.cost_usd, used.input_tokens, used.output_tokens, 1, int(used.cancelled), wasted_tokens(used)
            )
        }
        with contextlib.suppress(LedgerUnavailable):
            await self._call(
                ExchangeRequest(
                    executor=self._id,
                    report_id=uuid.uuid4().hex,
                    lease_id=held.lease_id,
                    ops=ops,
                    spend=spend,
                    day=utc_day(self._clock.time()),
                    close=True,
                )
            )


class ComposedGate:
    """Gates asked in order (the run's cost cap first, then the cluster budget). A refusal undoes the
    grants before it; settlement goes to all of them."""

    def __init__(self, gates: Sequence[SpendGate]) -> None:
        self._gates = list(gates)

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        grants: list[tuple[SpendGate, Grant]] = []
        for gate in self._gates:
            answer = await gate.reserve(ask)
            if isinstance(answer, Refusal):
                for earlier, grant in reversed(grants):
                    release = getattr(earlier, "release", None)
                    if release is not None:
                        release(grant)
                    else:  # never sent: settles as free
                        await earlier.settle(grant, Usage(0, 0, 0.0))
                return answer
            grants.append((gate, answer))
        return Grant(ask, grants)

    async def settle(self, grant: Grant, used: Usage) -> None:
        for gate, inner in grant.token:  # type: ignore[attr-defined]
            await gate.settle(inner, used)
