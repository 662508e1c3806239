"""A circuit breaker per model: stop sending work to a model that keeps failing, probe it after a pause.

closed -> open after `consecutive_failures` failures in a row, or a failure rate of at least
`failure_rate` over the last `window_s` (once `min_requests` outcomes are in it). open -> half-open
when `cooldown_s` has passed: one probe attempt at a time is allowed. half-open -> closed on the
probe's success, back to open (a fresh cool-down) on its failure. While open, the hedging policy
skips the model. Only provider-health failures count (5xx, overload, rate limit, timeouts,
connection drops); a 400 for a too-long prompt says nothing about the model's health.

Pure: time comes in as arguments (monotonic seconds).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class CircuitState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


# For the `tailrace_circuit_state` gauge.
STATE_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


class BreakerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    consecutive_failures: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.3, gt=0, le=1)
    window_s: float = Field(default=30.0, gt=0)
    min_requests: int = Field(default=10, ge=1)
    cooldown_s: float = Field(default=5.0, gt=0)

    def scaled(self, factor: float) -> BreakerConfig:
        return self.model_copy(update={"window_s": self.window_s * factor, "cooldown_s": self.cooldown_s * factor})


class CircuitBreaker:
    def __init__(self, config: BreakerConfig | None = None) -> None:
        self.config = config or BreakerConfig()
        self.state = CircuitState.CLOSED
        self._consecutive = 0
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, failed)
        self._failures = 0  # failed outcomes in `_outcomes`
        self._opened_at = 0.0
        self._probing = False

    def _advance(self, now: float) -> None:
        if self.state == CircuitState.OPEN and now - self._opened_at >= self.config.cooldown_s:
            self.state = CircuitState.HALF_OPEN
            self._probing = False

    def current(self, now: float) -> CircuitState:
        self._advance(now)
        return self.state

    def allows(self, now: float) -> bool:
        """Whether an attempt may be sent now (half-open: only when no probe is out)."""
        self._advance(now)
        if self.state == CircuitState.CLOSED:
            return True
        return self.state == CircuitState.HALF_OPEN and not self._probing

    def started(self, now: float) -> None:
        """An attempt was sent; in half-open it is the probe."""
        self._advance(now)
        if self.state == CircuitState.HALF_OPEN:
            self._probing = True

    def record(self, now: float, failed: bool) -> None:
        self._advance(now)
        horizon = now - self.config.window_s
        self._outcomes.append((now, failed))
        self._failures += failed
        while self._outcomes and self._outcomes[0][0] < horizon:
            self._failures -= self._outcomes.popleft()[1]
        if self.state == CircuitState.HALF_OPEN:
            if failed:
                self._open(now)
            else:
                self._close()
            return
        if self.state == CircuitState.OPEN:
            return  # an attempt sent before the circuit opened; the cool-down decides
        self._consecutive = self._consecutive + 1 if failed else 0
        failures = self._failures
        by_rate = (
            len(self._outcomes) >= self.config.min_requests
            and failures / len(self._outcomes) >= self.config.failure_rate
        )
        if self._consecutive >= self.config.consecutive_failures or by_rate:
            self._open(now)

    def abandoned(self, now: float) -> None:
        """The probe ended without telling anything (cancelled): let another probe go."""
        self._advance(now)
        if self.state == CircuitState.HALF_OPEN:
            self._probing = False

    def outrun(self, now: float) -> None:
        """An attempt was cancelled because another model answered first. Closed, that is what hedging
        is for. Half-open, the probe says the model is still slower than the alternative: open again
        for a fresh cool-down. (Treated as "told nothing", every next step's first attempt became the
        next probe and lost the same race: half of a brownout's steps started on the slowed model.)"""
        self._advance(now)
        if self.state == CircuitState.HALF_OPEN and self._probing:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = CircuitState.OPEN
        self._opened_at = now
        self._probing = False
        self._consecutive = 0
        self._outcomes.clear()
        self._failures = 0

    def _close(self) -> None:
        self.state = CircuitState.CLOSED
        self._consecutive = 0
        self._probing = False
        self._outcomes.clear()
        self._failures = 0


class BreakerBoard:
    """One breaker per model, created on first use; `on_change(model, state)` hears every transition."""

    def __init__(
        self, config: BreakerConfig | None = None, on_change: Callable[[str, CircuitState], None] | None = None
    ) -> None:
        self.config = config or BreakerConfig()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._on_change = on_change

    def _get(self, model: str) -> CircuitBreaker:
        breaker = self._breakers.get(model)
        if breaker is None:
            breaker = self._breakers[model] = CircuitBreaker(self.config)
        return breaker

    def _watched(self, model: str, act: Callable[[CircuitBreaker], T]) -> T:
        """Run `act` on the model's breaker and report a state change it caused."""
        breaker = self._get(model)
        before = breaker.state
        result = act(breaker)
        if breaker.state != before and self._on_change is not None:
            self._on_change(model, breaker.state)
        return result

    def state(self, model: str, now: float) -> CircuitState:
        return self._watched(model, lambda b: b.current(now))

    def allows(self, model: str, now: float) -> bool:
        return self._watched(model, lambda b: b.allows(now))

    def started(self, model: str, now: float) -> None:
        self._get(model).started(now)

    def record(self, model: str, now: float, failed: bool) -> None:
        self._watched(model, lambda b: b.record(now, failed))

    def abandoned(self, model: str, now: float) -> None:
        self._get(model).abandoned(now)

    def outrun(self, model: str, now: float) -> None:
        self._watched(model, lambda b: b.outrun(now))

    def states(self, now: float) -> dict[str, CircuitState]:
        return {m: self.state(m, now) for m in list(self._breakers)}
