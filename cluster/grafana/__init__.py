"""The Grafana dashboard for tailrace's series (`tailrace.json`): import it into the Grafana that Ray's
`ray metrics launch-prometheus` setup feeds (see README, "Watching it on the dashboard")."""

from pathlib import Path

DASHBOARD = Path(__file__).with_name("tailrace.json")
