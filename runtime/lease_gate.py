"""The `SpendGate` an executor's step runner uses in lease mode: reservations served from the executor's
lease (`tailrace.runtime.lease_pool.LeasePool`).

`tailrace.runtime.direct_gate` has the one-actor-call-per-attempt alternative (`BudgetConfig.mode="direct"`)
and `ComposedGate`, which puts the run's cost cap in front of either.
"""

from __future__ import annotations

from tailrace.policies.spend import Grant, Refusal, SpendAsk, Usage
from tailrace.runtime._budget_common import LedgerClient, LocalLedgerClient
from tailrace.runtime.lease_pool import LeasePool

__all__ = ["LeaseGate", "LeasePool", "LedgerClient", "LocalLedgerClient"]


class LeaseGate:
    """Reserve, settle and release through the executor's `LeasePool`."""

    def __init__(self, pool: LeasePool) -> None:
        self._pool = pool

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        return await self._pool.reserve(ask)

    async def settle(self, grant: Grant, used: Usage) -> None:
        await self._pool.settle(grant, used)

    def release(self, grant: Grant) -> None:
        self._pool.release(grant)
