"""The Ray actors: the step executor (wraps `tailrace.runtime.StepRunner`), the cluster budget actor and
the latency-statistics actor executors share. Everything they run is Ray-free and lives in
`tailrace.runtime` and `tailrace.policies`."""

from tailrace.actors.budget_actor import BudgetActor, BudgetHandle
from tailrace.actors.latency_stats import LatencyStatsActor
from tailrace.actors.step_executor import StepExecutor

__all__ = ["BudgetActor", "BudgetHandle", "LatencyStatsActor", "StepExecutor"]
