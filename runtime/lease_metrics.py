"""The lease pool's metrics: counted locally per attempt, pushed with each ledger report.

Counting into `ray.util.metrics` on every reservation would cost more than the reservation itself,
so the pool adds to plain dictionaries and `flush` hands the totals to `tailrace.runtime.metrics`
once per report. A metrics failure is logged and counted, never allowed to lose a report.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from tailrace.runtime import metrics

log = logging.getLogger("tailrace.budget")


def _amounts() -> defaultdict[str, float]:
    return defaultdict(float)


@dataclass
class LeaseCounters:
    """Per bucket label: reserved, used, refunded and wasted amounts; refusals by reason; grants."""

    reserved: defaultdict[str, float] = field(default_factory=_amounts)
    used: defaultdict[str, float] = field(default_factory=_amounts)
    refunded: defaultdict[str, float] = field(default_factory=_amounts)
    wasted: defaultdict[str, float] = field(default_factory=_amounts)
    refusals: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # since the last flush
    refused_total: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # since start
    grants: int = 0
    waited: int = 0
    leases_lost: int = 0
    flush_errors: int = 0  # metrics exports that failed (logged); never worth a lost report

    def refused(self, reason: str) -> None:
        self.refusals[reason] += 1
        self.refused_total[reason] += 1

    def flush(self) -> None:
        for name, values, help_ in (
            ("tailrace_budget_reserved_total", self.reserved, "Amount reserved before attempts, per bucket"),
            ("tailrace_budget_used_total", self.used, "Amount attempts finally cost, per bucket"),
            ("tailrace_budget_refunded_total", self.refunded, "Reserved but not charged, given back, per bucket"),
            ("tailrace_budget_wasted_total", self.wasted, "Amount charged by attempts that were cancelled"),
        ):
            for key, v in values.items():
                metrics.count(name, help_, {"bucket": key}, v)
            values.clear()
        for reason, n in self.refusals.items():
            metrics.count("tailrace_budget_refusals_total", "Reservations refused, by reason", {"reason": reason}, n)
        self.refusals.clear()
        metrics.count("tailrace_budget_grants_total", "Reservations granted", {}, self.grants)
        metrics.count("tailrace_budget_waits_total", "Reservations that waited for a top-up", {}, self.waited)
        metrics.count("tailrace_budget_leases_lost_total", "Leases found expired at the ledger", {}, self.leases_lost)
        self.grants = self.waited = self.leases_lost = 0

    def flush_safely(self, executor: str, waiting: int) -> None:
        """Flush, and report how many reservations wait; a failure is logged and counted, not raised."""
        try:
            self.flush()
            metrics.gauge(
                "tailrace_budget_waiting",
                "Reservations waiting for budget in this executor",
                {"executor": executor},
                waiting,
            )
        except Exception:
            self.flush_errors += 1
            log.warning("budget metrics export failed (%d so far)", self.flush_errors, exc_info=True)
