"""The seam between a step executor and the policy that decides its attempts.

An executor shows the policy what its attempts are doing (`AttemptState`) and asks what to do next.
The answer is a `Start` (which rung of the model ladder, when, in what role), a `Cancel` (stop one
running attempt, with a reason: it timed out, or a sibling showed its model will not answer), a
`GiveUp`, or `None` (wait for the running attempts). A `Start` or `Cancel` dated in the future is a
wake-up: the executor asks again then. Pure: no clock, no I/O; time comes in as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tailrace.engine.outcomes import AttemptOutcome, CancelReason, FailureReason, ProviderError


@dataclass(frozen=True)
class AttemptState:
    tier: int
    started_at: float  # monotonic seconds
    role: str = "primary"
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    outcome: AttemptOutcome | None = None  # None while running
    error: ProviderError | None = None
    tokens: int | None = None  # input + output tokens as settled, once it has ended
    received_chars: int = 0  # answer text streamed so far
    cancel_reason: CancelReason | None = None  # why it was cancelled, when it was

    @property
    def running(self) -> bool:
        return self.outcome is None


@dataclass(frozen=True)
class Start:
    tier: int
    at: float  # monotonic time to start; <= now means at once
    role: str = "primary"  # primary | retry | duplicate


@dataclass(frozen=True)
class Cancel:
    attempt: int  # index in the attempts the policy was shown
    reason: CancelReason
    at: float  # monotonic time to cancel; <= now means at once


@dataclass(frozen=True)
class GiveUp:
    reason: FailureReason
    detail: str


Decision = Start | Cancel | GiveUp | None


class AttemptPolicy(Protocol):
    def decide(self, attempts: Sequence[AttemptState], now: float, deadline: float) -> Decision:
        """What to do next, given every attempt so far, the time now and the step's deadline."""
        ...


@runtime_checkable
class AttemptFeedback(Protocol):
    """Optional: a policy that also implements these hears what became of its `Start`s.

    `refused` matters most: a budget said no, and a policy that is not told would ask for the same
    attempt again at once. A runner whose policy lacks these waits for a running attempt to end
    before it asks again after a refusal.
    """

    def started(self, decision: Start, now: float) -> None: ...

    def refused(self, decision: Start, reason: str, now: float) -> None: ...
