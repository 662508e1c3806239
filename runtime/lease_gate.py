"""The `SpendGate` an executor's step runner uses in lease mode: reservations served from the executor's
lease (`tailrace.runtime.lease_pool.LeasePool`).

`tailrace.runtime.direct_gate` has the one-actor-call-per-attempt alternative (`BudgetConfig.mode="direct"`)
and `ComposedGate`, which puts the run's cost cap in front of either.
"""

from __future__ import annotations

import dataclasses

from tailrace.policies.spend import Grant, Refusal, SpendAsk, Usage
from tailrace.runtime._budget_common import LedgerClient, LocalLedgerClient
from tailrace.runtime.lease_pool import LeasePool

__all__ = ["LeaseGate", "LeasePool", "LedgerClient", "LocalLedgerClient"]


class LeaseGate:
    """Reserve, settle and release through the executor's `LeasePool`, for one step: `continuing` when
    its run already has steps done (its attempts are served before runs' first steps)."""

    def __init__(self, pool: LeasePool, continuing: bool = False) -> None:
        self._pool = pool
        self._continuing = continuing

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        if self._continuing and not ask.continuing:
            ask = dataclasses.replace(ask, continuing=True)
        return await self._pool.reserve(ask)

    async def settle(self, grant: Grant, used: Usage) -> None:
        await self._pool.settle(grant, used)

    def release(self, grant: Grant) -> None:
        self._pool.release(grant)
