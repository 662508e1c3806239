"""Sequential, deadline-aware retries over a step's model ladder (no duplicates).

One attempt at a time. A failed or invalid attempt starts the next at once (or after the provider's
retry hint, when that still fits before the deadline):
- a retryable error retries the same rung, up to `per_tier_attempts`, then moves down the ladder;
- an invalid answer moves down the ladder (the same prompt to the same model tends to fail again),
  or retries the last rung;
- a non-retryable error never retries that model; errors that are the whole account's
  (auth, quota) skip every rung on that provider.
A rung whose expected latency cannot fit in the remaining time is skipped when a faster one exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tailrace.engine.outcomes import AttemptOutcome, ErrorKind, FailureReason
from tailrace.engine.specs import ModelChoice
from tailrace.policies.attempts import AttemptState, Decision, GiveUp, Start

ACCOUNT_WIDE = frozenset({ErrorKind.AUTH, ErrorKind.QUOTA_EXHAUSTED})
BACKOFF_BASE_S = 0.05


@dataclass(frozen=True)
class Rung:
    tier: int
    provider: str
    model: str
    expected_latency_s: float

    @classmethod
    def ladder(cls, models: Sequence[ModelChoice]) -> list[Rung]:
        return [Rung(i, m.provider, m.model, m.expected_latency_s) for i, m in enumerate(models)]


class SequentialRetryPolicy:
    def __init__(self, rungs: Sequence[Rung], max_attempts: int = 4, per_tier_attempts: int = 2) -> None:
        self._rungs = list(rungs)
        self._max_attempts = max_attempts
        self._per_tier = per_tier_attempts

    def decide(self, attempts: Sequence[AttemptState], now: float, deadline: float) -> Decision:
        if any(a.running for a in attempts):
            return None
        if now >= deadline:
            return GiveUp(FailureReason.DEADLINE_EXCEEDED, "no time left")
        if not attempts:
            return self._start_at(self._usable(0, set(), set()), now, deadline, "primary", set(), set())
        if len(attempts) >= self._max_attempts:
            return self._exhausted(attempts[-1], f"gave up after {len(attempts)} attempts")
        banned_models, banned_providers = self._banned(attempts)
        last = attempts[-1]
        tier = last.tier
        per_tier = sum(1 for a in attempts if a.tier == tier)
        if last.outcome == AttemptOutcome.INVALID:
            candidates = [tier + 1, tier] if tier + 1 < len(self._rungs) else [tier]
        elif last.error is not None and last.error.retryable and per_tier < self._per_tier:
            candidates = [tier, tier + 1]
        else:
            candidates = [tier + 1]
        for start_tier in candidates:
            rung = self._usable(start_tier, banned_models, banned_providers)
            if rung is None:
                continue
            at = now
            if rung.tier == tier and last.error is not None:
                # Measured from when the failure happened, so asking again later does not push it back.
                finished = last.finished_at if last.finished_at is not None else now
                at = max(now, finished + self._wait_before_retry(last, per_tier))
            if at < deadline:
                return self._start_at(rung, at, deadline, "retry", banned_models, banned_providers)
        return self._exhausted(last, "no model left to try")

    def _start_at(
        self,
        rung: Rung | None,
        at: float,
        deadline: float,
        role: str,
        banned_models: set[str],
        banned_providers: set[str],
    ) -> Decision:
        if rung is None:
            return GiveUp(FailureReason.PROVIDER_ERROR, "no usable model")
        below = [
            r for r in self._rungs[rung.tier :] if r.model not in banned_models and r.provider not in banned_providers
        ]
        return Start(self._fit(below, deadline - at).tier, at, role)

    @staticmethod
    def _fit(rungs: list[Rung], remaining: float) -> Rung:
        """The strongest rung whose expected latency fits in the remaining time; else the fastest."""
        for r in rungs:
            if r.expected_latency_s <= remaining:
                return r
        return min(rungs, key=lambda r: r.expected_latency_s)

    def _usable(self, tier: int, banned_models: set[str], banned_providers: set[str]) -> Rung | None:
        for rung in self._rungs[tier:]:
            if rung.model not in banned_models and rung.provider not in banned_providers:
                return rung
        return None

    def _banned(self, attempts: Sequence[AttemptState]) -> tuple[set[str], set[str]]:
        models: set[str] = set()
        providers: set[str] = set()
        for a in attempts:
            if a.error is not None and not a.error.retryable:
                rung = self._rungs[a.tier]
                models.add(rung.model)
                if a.error.kind in ACCOUNT_WIDE:
                    providers.add(rung.provider)
        return models, providers

    @staticmethod
    def _wait_before_retry(last: AttemptState, per_tier: int) -> float:
        assert last.error is not None
        if last.error.retry_after_s is not None:
            return last.error.retry_after_s
        return BACKOFF_BASE_S * (2 ** (per_tier - 1))

    @staticmethod
    def _exhausted(last: AttemptState, detail: str) -> GiveUp:
        if last.outcome == AttemptOutcome.INVALID:
            return GiveUp(FailureReason.INVALID_OUTPUT, detail)
        return GiveUp(FailureReason.PROVIDER_ERROR, detail)
