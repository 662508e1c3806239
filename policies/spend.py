"""The seam through which every attempt asks for budget before it is sent, and settles after.

A `SpendGate` is asked once per attempt (primary, retry or duplicate) with what the attempt may cost
at most (prompt estimate + max_tokens, as providers charge at admission). It answers with a grant or
a refusal; after the attempt the grant is settled with what was actually used. The run's cost cap
is the gate built here; the cluster-wide budget (`tailrace.runtime.lease_gate`) plugs in behind the
same protocol and can use `role`, `continuing` and `deadline_at` to rank duplicates below primaries,
steps of runs under way before runs' first steps, and urgent runs first.

`attempt_usage` is the one definition of what an attempt cost: the attempt's record (and so the run's
cost and `tailrace report`) and the ledger's recorded spend both take its figures, so they agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tailrace.engine.outcomes import AttemptOutcome


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
    continuing: bool = False  # its run already has steps done: it comes before runs' first steps
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
    """What one attempt cost, as billed (see `attempt_usage`), and what the provider said of its limits."""

    input_tokens: int
    output_tokens: int
    cost_usd: float
    reported: bool = True  # False: our estimate (cancelled mid-stream, failed, no usage in the answer)
    cancelled: bool = False
    valid: bool = True  # False: it gave no valid answer (error, invalid, cancelled): its tokens are wasted
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


def attempt_usage(
    price: Callable[[int, int], float],
    ask: SpendAsk,
    outcome: AttemptOutcome,
    *,
    reported_input: int | None,
    reported_output: int | None,
    received_tokens: int,
    rate_limit: Mapping[str, str] | None = None,
    status: int | None = None,
    retry_after_s: float | None = None,
) -> Usage:
    """What an attempt cost: what the provider reported; else, for an attempt that failed before any token
    (429, 5xx, a reset), nothing, as providers bill nothing for it; else (cancelled, or an answer without
    usage) the prompt estimate plus the tokens received. `price(input, output)` is the rung's price."""
    reported = reported_input is not None and reported_output is not None
    if reported:
        input_tokens, output_tokens = int(reported_input or 0), int(reported_output or 0)
    elif outcome == AttemptOutcome.ERROR and received_tokens == 0:
        input_tokens, output_tokens = 0, 0
    else:
        input_tokens = reported_input if reported_input is not None else ask.input_tokens
        output_tokens = reported_output if reported_output is not None else received_tokens
    return Usage(
        input_tokens,
        output_tokens,
        price(input_tokens, output_tokens),
        reported=reported,
        cancelled=outcome == AttemptOutcome.CANCELLED,
        valid=outcome == AttemptOutcome.VALID,
        rate_limit=dict(rate_limit or {}),
        status=status,
        retry_after_s=retry_after_s,
    )


def wasted_tokens(used: Usage) -> int:
    """Tokens billed to an attempt that gave no valid answer (the ledger's and the outcomes' one figure)."""
    return 0 if used.valid else used.input_tokens + used.output_tokens
