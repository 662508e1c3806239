"""The Ray actors: the step executor (wraps `tailrace.runtime.StepRunner`), the cluster budget actor and
the latency-statistics actor executors share. Everything they run is Ray-free and lives in
`tailrace.runtime` and `tailrace.policies`."""

from __future__ import annotations

from tailrace.engine._lazy import lazy_exports

_EXPORTS = {
    "BudgetActor": "tailrace.actors.budget_actor",
    "BudgetHandle": "tailrace.actors.budget_actor",
    "LatencyStatsActor": "tailrace.actors.latency_stats",
    "StepExecutor": "tailrace.actors.step_executor",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
