"""Continuously refilled buckets, the unit of every rate and spend limit (TPM, RPM, input/output TPM, USD).

A bucket has a `capacity` (the provider's limit per window) refilled at `rate_per_s`. Tokens leave it
two ways: granted to a lease (`outstanding`: held by an executor, not yet spent) or spent. The
invariant that keeps us under the provider's own bucket is `level + outstanding <= capacity`: tokens
an executor holds are still "in the bucket" from the provider's point of view, so refill stops while
leases hold them. Refill is continuous (as OpenAI and Anthropic describe theirs), never a window
reset. A rate of 0 makes a spend allowance (a tenant's daily USD) out of the same arithmetic.

Pure: every method takes `now` (seconds on one clock); tests drive it with plain numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NEVER = math.inf


@dataclass
class TokenBucket:
    capacity: float
    rate_per_s: float
    level: float
    last: float
    outstanding: float = 0.0
    blocked_until: float = -math.inf
    # Running totals, for metrics and status. Every grant ends one way: granted = spent + returned +
    # written_off + outstanding, exactly. Debits (use beyond any grant) are counted on their own.
    granted_total: float = 0.0
    spent_total: float = 0.0
    returned_total: float = 0.0
    written_off_total: float = 0.0
    debited_total: float = 0.0
    clamped_total: float = 0.0

    @classmethod
    def full(cls, capacity: float, rate_per_s: float, now: float) -> TokenBucket:
        return cls(capacity, rate_per_s, capacity, now)

    @classmethod
    def empty(cls, capacity: float, rate_per_s: float, now: float) -> TokenBucket:
        """For a ledger that may have forgotten recent spend (a restart without Redis): start dry."""
        return cls(capacity, rate_per_s, 0.0, now)

    # ---- time --------------------------------------------------------------------------------

    def refill(self, now: float) -> None:
        dt = max(0.0, now - self.last)
        room = self.capacity - self.outstanding
        if self.level < room:
            self.level = min(room, self.level + dt * self.rate_per_s)
        self.last = max(self.last, now)

    def available(self, now: float) -> float:
        """What can be granted right now."""
        self.refill(now)
        if now < self.blocked_until:
            return 0.0
        return max(0.0, self.level)

    def seconds_until(self, amount: float, now: float) -> float:
        """Earliest time (from now) `amount` could be granted if nobody else took anything; inf if never."""
        if amount > self.capacity + 1e-9:
            return NEVER
        self.refill(now)
        wait_block = max(0.0, self.blocked_until - now)
        short = amount - self.level
        if short <= 0:
            return wait_block
        if self.rate_per_s <= 0:
            return NEVER
        return max(wait_block, short / self.rate_per_s)

    def utilisation(self, now: float) -> float:
        """Fraction of the capacity not available for new grants (0 idle, 1 saturated)."""
        self.refill(now)
        return min(1.0, max(0.0, 1.0 - self.level / self.capacity)) if self.capacity > 0 else 1.0

    # ---- grants and their return ---------------------------------------------------------------

    def take(self, want: float, now: float) -> float:
        """Grant up to `want` to a lease; returns the amount granted (may be less, or 0)."""
        granted = min(max(0.0, want), self.available(now))
        self.level -= granted
        self.outstanding += granted
        self.granted_total += granted
        return granted

    def take_exactly(self, amount: float, now: float) -> bool:
        if self.available(now) + 1e-9 < amount:
            return False
        self.take(amount, now)
        return True

    def give_back(self, amount: float, now: float) -> float:
        """An executor returns unspent tokens it held; they become grantable again."""
        self.refill(now)
        amount = min(max(0.0, amount), self.outstanding)
        self.outstanding -= amount
        self.level += amount
        self.returned_total += amount
        return amount

    def spend(self, amount: float, now: float) -> float:
        """Held tokens were used: they leave the bucket (the provider refills them over time).

        Refill first: until now the held tokens filled the room, so no refill was due for them. (Refilling
        afterwards would credit the whole interval with the larger room, more than the provider got.)"""
        self.refill(now)
        amount = min(max(0.0, amount), self.outstanding)
        self.outstanding -= amount
        self.spent_total += amount
        return amount

    def write_off(self, amount: float, now: float) -> float:
        """A lease expired unreturned: assume its holder spent it all (never assume it was free)."""
        self.refill(now)
        amount = min(max(0.0, amount), self.outstanding)
        self.outstanding -= amount
        self.written_off_total += amount
        return amount

    def refund(self, amount: float, now: float) -> None:
        """Tokens reported spent that the provider did not charge after all (prompt over-estimate,
        Anthropic's output correction): grantable again, never above the capacity."""
        self.refill(now)
        self.level = min(self.capacity - self.outstanding, self.level + max(0.0, amount))

    def debit(self, amount: float, now: float) -> None:
        """Charge beyond any grant (an attempt used more than it reserved; spend while Redis was down).
        The level may go negative: a debt repaid by refill before anything else is granted."""
        self.refill(now)
        self.level -= max(0.0, amount)
        self.debited_total += max(0.0, amount)

    # ---- what the provider says ------------------------------------------------------------------

    def clamp(self, provider_remaining: float, now: float) -> float:
        """The provider reports fewer tokens left than we have free (someone else shares the key):
        trust it, our free level goes down to its figure. Returns how much was removed.

        Compared with the free level only: tokens held by leases are partly in flight, already
        charged by the provider, so `level + outstanding` may rightly exceed what it reports."""
        self.refill(now)
        if self.level <= provider_remaining:
            return 0.0
        removed = self.level - max(provider_remaining, -self.capacity)
        self.level -= removed
        self.clamped_total += removed
        return removed

    def block(self, seconds: float, now: float) -> None:
        """A 429 with Retry-After: grant nothing until then, and drop whatever we thought was left."""
        self.refill(now)
        self.blocked_until = max(self.blocked_until, now + max(0.0, seconds))
        if self.level > 0:
            self.clamped_total += self.level
            self.level = 0.0

    @property
    def unreconciled(self) -> float:
        """granted - (spent + returned + written_off + outstanding): 0 while the ledger adds up."""
        return self.granted_total - (self.spent_total + self.returned_total + self.written_off_total + self.outstanding)

    def resize(self, capacity: float, rate_per_s: float, now: float) -> None:
        """New configured limits; a lower capacity takes effect at once."""
        self.refill(now)
        self.capacity, self.rate_per_s = capacity, rate_per_s
        self.level = min(self.level, capacity - self.outstanding)
