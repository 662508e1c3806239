"""The seam through which every attempt asks for budget before it is sent, and settles after.

A `SpendGate` is asked once per attempt (primary, retry or duplicate) with what the attempt may cost
at most (prompt estimate + max_tokens, as providers charge at admission). It answers with a grant or
a refusal; after the attempt the grant is settled with what was actually used. The run's cost cap
is the gate built here; the cluster-wide budget (`tailrace.runtime.lease_gate`) plugs in behind the
same protocol and can use `role` and `deadline_at` to rank duplicates below primaries and urgent runs first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, kw_only=True)
class SpendAsk:
    """What one attempt may use at most. Planning (admission) asks with the token fields alone."""

    input_tokens: int  # estimate
    max_output_tokens: int
    cost_usd: float = 0.0  # at most, if every max_token is produced
    run_id: str = ""
    step_id: str = ""
    tenant: str = "default"
    provider: str = ""
    model: str = ""
    role: str = "primary"  # primary | retry | duplicate
    deadline_at: float = math.inf  # the step's deadline on the executor's monotonic clock (converted once)


@dataclass(frozen=True)
class Grant:
    ask: SpendAsk
    token: object = None  # the gate's own handle for settling


@dataclass(frozen=True)
class Refusal:
    reason: str


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int
    cost_usd: float
    reported: bool = True  # False: our conservative estimate (e.g. cancelled mid-stream)
    cancelled: bool = False
    # What the provider said about its limits, so a budget can trust it over its own ledger.
    rate_limit: dict[str, str] = field(default_factory=dict)
    status: int | None = None  # HTTP status of a failed attempt (429 ...)
    retry_after_s: float | None = None


class SpendGate(Protocol):
    async def reserve(self, ask: SpendAsk) -> Grant | Refusal: ...

    async def settle(self, grant: Grant, used: Usage) -> None: ...


class RunCostGate:
    """Holds one step's share of its run's cost cap: reserves the worst case, refunds the rest."""

    def __init__(self, remaining_usd: float | None) -> None:
        self._remaining = remaining_usd
        self.spent_usd = 0.0

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        if self._remaining is not None:
            if ask.cost_usd > self._remaining:
                return Refusal(f"run cost cap: attempt may cost ${ask.cost_usd:.6f}, ${self._remaining:.6f} left")
            self._remaining -= ask.cost_usd
        return Grant(ask)

    async def settle(self, grant: Grant, used: Usage) -> None:
        if self._remaining is not None:
            self._remaining += grant.ask.cost_usd - used.cost_usd
        self.spent_usd += used.cost_usd
