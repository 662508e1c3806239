"""How much of each bucket an executor should ask its lease to hold: recent demand, smoothed.

Demand is the rate reserved since the last report (units per second), halved toward the new figure
at each report. A lease aims to hold `HORIZON_PERIODS` report periods of it plus two round trips to
the ledger (a slow or busy ledger must not starve the executor between top-ups), at least the largest
recent single need (so one big attempt is not starved by many small ones), plus what waits in the
queue, less what it already holds. Pure: time is a `now` argument.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

HORIZON_PERIODS = 4  # a lease aims to hold this many report periods of demand


class DemandEstimate:
    def __init__(self, flush_interval_s: float) -> None:
        self._horizon_s = flush_interval_s * HORIZON_PERIODS
        self._rate: defaultdict[str, float] = defaultdict(float)  # units/s, smoothed
        self._since_report: defaultdict[str, float] = defaultdict(float)
        self._largest: defaultdict[str, float] = defaultdict(float)  # largest recent single need

    def asked(self, need: Mapping[str, float]) -> None:
        """A reservation asked for `need` (granted or not): the largest recent need decays slowly."""
        for key, amount in need.items():
            self._largest[key] = max(self._largest[key] * 0.99, amount)

    def reserved(self, need: Mapping[str, float]) -> None:
        for key, amount in need.items():
            self._since_report[key] += amount

    def report(self, elapsed_s: float) -> None:
        """A report is being built: fold what was reserved since the last one into the smoothed rate."""
        for key, amount in self._since_report.items():
            self._rate[key] = 0.5 * self._rate[key] + 0.5 * amount / elapsed_s
        self._since_report.clear()

    def wants(
        self, balances: Mapping[str, float], queued: Mapping[str, float], round_trip_s: float = 0.0
    ) -> dict[str, float]:
        horizon = self._horizon_s + 2 * max(0.0, round_trip_s)
        out = {}
        for key in set(self._rate) | set(queued) | set(self._largest):
            want = max(self._rate[key] * horizon, self._largest[key]) + queued.get(key, 0.0)
            out[key] = max(0.0, want - balances.get(key, 0.0))
        return out
