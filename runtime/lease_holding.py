"""What one executor holds of the cluster budget: its lease, the balance per bucket, and the ledger's view.

A lease is usable until a little before the ledger would expire it (the TTL counted from when the
exchange was *sent*, less a margin), so the executor never spends a balance the ledger has already
written off. Reservations subtract from the balance; what an attempt did not use comes back to it
while the same lease lives. A 429 blocks a bucket here at once, before the ledger hears of it.

`eta` is the fail-fast bound: the earliest a need could be granted given what waits ahead of it, what
this lease holds and what the whole ledger had free at its last view, at the bucket's full rate.
Pure: time is a `now` argument (monotonic seconds).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

from tailrace.policies.leases import BucketView, ExchangeReply


class LeaseHolding:
    def __init__(self) -> None:
        self.lease_id: str | None = None
        self.balances: defaultdict[str, float] = defaultdict(float)
        self.expires = -math.inf
        self.views: dict[str, BucketView] = {}
        self.views_at = -math.inf
        self.targets: dict[str, float] = {}  # fair holding per bucket when contended
        self.blocked_until: dict[str, float] = {}  # a 429 seen here: grant nothing from the bucket until then

    def usable(self, now: float) -> bool:
        return self.lease_id is not None and now < self.expires

    def fits(self, need: Mapping[str, float], now: float) -> bool:
        return all(
            self.balances[k] + 1e-9 >= a and self.blocked_until.get(k, -math.inf) <= now for k, a in need.items()
        )

    def take(self, need: Mapping[str, float]) -> None:
        for key, amount in need.items():
            self.balances[key] -= amount

    def block(self, key: str, until: float) -> None:
        self.blocked_until[key] = max(self.blocked_until.get(key, -math.inf), until)

    def free_fraction(self, now: float) -> dict[str, float]:
        """Per bucket, the fraction of the whole limit the ledger has free (refilled since its last view)."""
        out = {}
        for key, view in self.views.items():
            refilled = view.level + view.rate_per_s * max(0.0, now - self.views_at)
            out[key] = min(max(0.0, refilled), view.capacity - view.outstanding) / view.capacity
        return out

    def eta(self, need: Mapping[str, float], ahead: Mapping[str, float], now: float) -> float:
        """A lower bound on when `need` could be granted, with `ahead` waiting before it."""
        since = max(0.0, now - self.views_at)
        worst = 0.0
        for key, amount in need.items():
            wait = self.blocked_until.get(key, -math.inf) - now
            view = self.views.get(key)
            if view is not None:
                wait = max(wait, view.blocked_s - since)
                free = min(view.capacity - view.outstanding, max(0.0, view.level + view.rate_per_s * since))
                short = ahead.get(key, 0.0) + amount - self.balances[key] - free
                if short > 0:
                    wait = max(wait, short / view.rate_per_s if view.rate_per_s > 0 else math.inf)
            worst = max(worst, wait)
        return worst

    def scarcest(self, need: Mapping[str, float]) -> str:
        """The bucket of `need` that takes longest to refill (for a refusal's message)."""
        return max(need, key=lambda k: need[k] / max(self.views[k].rate_per_s, 1e-9) if k in self.views else 0)

    def excess(self, key: str, return_above: float) -> float:
        """What this lease holds of `key` beyond `return_above` times its fair holding (0 if uncontended)."""
        target = self.targets.get(key)
        if target is None or self.balances[key] <= target * return_above:
            return 0.0
        return self.balances[key] - target

    # ---- the ledger's answer -----------------------------------------------------------------------

    def absorb(self, reply: ExchangeReply, *, closed: bool, sent_at: float, now: float) -> None:
        """Take the ledger's reply: a new or renewed lease with its grants, or a closed one."""
        self.views, self.views_at, self.targets = dict(reply.buckets), now, dict(reply.targets)
        if closed:
            self.lease_id, self.expires = None, -math.inf
            self.balances.clear()
            return
        if reply.lost or reply.lease_id != self.lease_id:
            self.balances.clear()  # whatever was held under the old lease is the ledger's to write off
        self.lease_id = reply.lease_id
        margin = max(0.05, 0.1 * reply.ttl_s)
        self.expires = sent_at + reply.ttl_s - margin
        for key, amount in reply.granted.items():
            self.balances[key] += amount

    def forget_if_expired(self, now: float) -> None:
        """Expired here: the ledger writes the balance off; never spend it late."""
        if self.lease_id is not None and not self.usable(now) and any(self.balances.values()):
            self.balances.clear()
