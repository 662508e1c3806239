"""The shipped Grafana dashboard queries only series tailrace exports (with Ray's `ray_` prefix)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tailrace.runtime.run_metrics import SERIES

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "tailrace.json"
# Exported by the hedging policy's own counters, not by tailrace.runtime.run_metrics.
HEDGE_SERIES = {"tailrace_duplicates_sent_total", "tailrace_duplicates_won_total"}


def test_every_panel_queries_known_series():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 15 and exprs
    used = {re.sub(r"_(bucket|count|sum)$", "", name) for e in exprs for name in re.findall(r"ray_(tailrace_\w+)", e)}
    assert used <= set(SERIES) | HEDGE_SERIES, used - set(SERIES) - HEDGE_SERIES
    # Every series tailrace exports has a panel.
    assert set(SERIES) <= used, set(SERIES) - used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
