"""What the executor-side budget gates share: how they reach the ledger, and what an attempt needs.

An attempt needs, per bucket it touches, what the provider charges at admission (`reserve_amount`);
`needs` works that out once per (provider, model) and adds the tenant's daily USD allowance when
it has one. `Held` is the grant's handle: what was taken, from which lease, when.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tailrace.engine.clock import SYSTEM_CLOCK, Clock
from tailrace.policies.budget_config import BucketSpec, BudgetConfig, Charges, reserve_amount, utc_day
from tailrace.policies.leases import ExchangeReply, ExchangeRequest
from tailrace.policies.spend import SpendAsk


class LedgerClient(Protocol):
    async def exchange(self, req: ExchangeRequest) -> ExchangeReply: ...


class LocalLedgerClient:
    """A ledger in this process (tests, one-process use): the real `MemoryLedger`, no actor in between."""

    def __init__(self, ledger: Any, clock: Clock = SYSTEM_CLOCK) -> None:
        self._ledger = ledger
        self._clock = clock

    async def exchange(self, req: ExchangeRequest) -> ExchangeReply:
        return await self._ledger.exchange(req, self._clock.time(), uuid.uuid4().hex)


@dataclass(frozen=True)
class Held:
    specs: tuple[tuple[BucketSpec, Charges], ...]
    amounts: dict[str, float]
    lease_id: str | None = None
    granted_at: float = 0.0


@functools.lru_cache(maxsize=4096)
def bucket_label(key: str) -> str:
    return key.rsplit(":", 1)[0] if key.startswith("usd:") else key  # no day in metric labels


class Today:
    """The UTC day of an epoch time, recomputed only when the day changes (formatting dates is slow)."""

    def __init__(self) -> None:
        self._start, self._end, self._day = math.inf, -math.inf, ""

    def __call__(self, epoch_s: float) -> str:
        if not self._start <= epoch_s < self._end:
            self._start = math.floor(epoch_s / 86_400) * 86_400
            self._end = self._start + 86_400
            self._day = utc_day(epoch_s)
        return self._day


def needs(
    config: BudgetConfig, ask: SpendAsk, day: str, kinds: dict[tuple[str, str], tuple[tuple[BucketSpec, Charges], ...]]
) -> tuple[tuple[tuple[BucketSpec, Charges], ...], dict[str, float]]:
    cache_key = (ask.provider, ask.model)
    specs = kinds.get(cache_key)
    if specs is None:
        specs = tuple((spec, spec.charges or "admission") for spec in config.buckets_for(ask.provider, ask.model))
        kinds[cache_key] = specs
    usd = config.spend_bucket(ask.tenant, day) if config.tenants or config.default_tenant.daily_usd else None
    if usd is not None:
        specs = (*specs, (usd, "usage"))
    return specs, {spec.key: reserve_amount(spec, ask) for spec, _ in specs}


def too_large(specs: Sequence[tuple[BucketSpec, Charges]], need: dict[str, float]) -> str | None:
    for spec, _ in specs:
        if need[spec.key] > spec.capacity + 1e-9:
            what = "daily spend allowance" if spec.family == "usd" else "limit"
            return (
                f"budget_exhausted: the attempt needs {need[spec.key]:,.4g} of {spec.key}, more than the whole "
                f"{what} ({spec.capacity:,.4g})"
            )
    return None
