"""What ended attempts owe the ledger, kept until the next report: spend, unused reservations, debts, costs.

Held tokens are reported spent only when their attempt ends: until then the provider may not have
charged them yet, and the ledger must not start refilling for tokens the provider has not taken.
What an attempt did not use goes back to the live lease it came from; if that lease is gone, it is
kept here per lease and, once the ledger has written that lease off, sent back as a refund. Spend
of a lease the ledger wrote off is dropped: the write-off already counted it. Tenants' costs are
kept per (UTC day, tenant) and reported one day at a time.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict

from tailrace.policies.leases import ProviderFeedback, SpendDelta, SpendTotals

REMEMBERED_DEAD_LEASES = 256
NO_LEASE = ""


def _per_lease() -> defaultdict[str, defaultdict[str, float]]:
    return defaultdict(lambda: defaultdict(float))


class Unreported:
    def __init__(self) -> None:
        self._spent = _per_lease()  # lease -> bucket -> used of what it held
        self._unused = _per_lease()  # lease -> bucket -> not used, and not given back to a live lease
        self._dead: OrderedDict[str, None] = OrderedDict()  # leases the ledger wrote off (lost or closed)
        self.debits: defaultdict[str, float] = defaultdict(float)  # used beyond what was held
        self.spend: dict[tuple[str, str], SpendTotals] = {}
        self.feedback: dict[str, ProviderFeedback] = {}

    def ended(self, key: str, used: float, reserved: float, lease_id: str | None) -> float:
        """An attempt held `reserved` of bucket `key` and used `used`: record it; return what it did not use."""
        self._spent[lease_id or NO_LEASE][key] += min(used, reserved)
        if used > reserved:
            self.debits[key] += used - reserved
        return reserved - used

    def unused_elsewhere(self, lease_id: str | None, key: str, amount: float) -> None:
        """Unused tokens of a lease that is no longer live here: refunded once the ledger wrote it off."""
        self._unused[lease_id or NO_LEASE][key] += amount

    def cost(self, day: str, tenant: str, delta: SpendDelta) -> None:
        totals = self.spend.get((day, tenant))
        if totals is None:
            totals = self.spend[(day, tenant)] = SpendTotals()
        totals.add(delta)

    def written_off(self, lease_id: str) -> None:
        self._dead[lease_id] = None
        while len(self._dead) > REMEMBERED_DEAD_LEASES:
            self._dead.popitem(last=False)

    def any(self) -> bool:
        return bool(
            self.spend
            or self.feedback
            or any(any(v.values()) for v in self._spent.values())
            or any(any(v.values()) for v in self._unused.values())
            or any(self.debits.values())
        )

    def take_lease(self, lease_id: str | None) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """For a report on `lease_id`: (spent under it, unused under it, refunds from leases written off).
        Spend under leases written off is dropped."""
        lease = lease_id or NO_LEASE
        spent = dict(self._spent.pop(lease, {}))
        unused = dict(self._unused.pop(lease, {}))
        refunds: defaultdict[str, float] = defaultdict(float)
        for dead in [x for x in self._unused if x in self._dead or x == NO_LEASE]:
            for key, amount in self._unused.pop(dead).items():
                refunds[key] += amount  # that lease was written off: these tokens are free again
        for dead in [x for x in self._spent if x in self._dead or x == NO_LEASE]:
            del self._spent[dead]  # written off with its lease already
        return spent, unused, dict(refunds)

    def take_debits(self) -> dict[str, float]:
        debits = dict(self.debits)
        self.debits.clear()
        return debits

    def take_feedback(self) -> dict[str, ProviderFeedback]:
        feedback = dict(self.feedback)
        self.feedback.clear()
        return feedback

    def take_one_day(self, today: str) -> tuple[str, dict[str, SpendDelta]]:
        """The oldest day's recorded costs per tenant (or today, with none)."""
        days = sorted({d for d, _ in self.spend})
        day = days[0] if days else today
        out = {t: SpendDelta(**vars(self.spend.pop((d, t)))) for d, t in list(self.spend) if d == day}
        return day, out
