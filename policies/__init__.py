"""Pure decisions on fake time, no I/O and no Ray: which attempt to start next and when (hedging, the
ladder, breakers, throttle), how a run's time and tokens are shared among its steps, and the budget's
buckets, leases, priority and admission. Every method takes `now`; tests drive them with tables."""

from __future__ import annotations

from tailrace.engine._lazy import lazy_exports

_EXPORTS = {
    "AttemptFeedback": "tailrace.policies.attempts",
    "AttemptPolicy": "tailrace.policies.attempts",
    "AttemptState": "tailrace.policies.attempts",
    "BudgetConfig": "tailrace.policies.budget_config",
    "Decision": "tailrace.policies.attempts",
    "GiveUp": "tailrace.policies.attempts",
    "Grant": "tailrace.policies.spend",
    "HedgingPolicy": "tailrace.policies.hedging",
    "LimitSpec": "tailrace.policies.budget_config",
    "Refusal": "tailrace.policies.spend",
    "RunCostGate": "tailrace.policies.spend",
    "SpendAsk": "tailrace.policies.spend",
    "SpendGate": "tailrace.policies.spend",
    "Start": "tailrace.policies.attempts",
    "TailState": "tailrace.policies.hedging",
    "TailTuning": "tailrace.policies.hedging",
    "TenantBudget": "tailrace.policies.budget_config",
    "Usage": "tailrace.policies.spend",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
