"""Pure decisions on fake time, no I/O and no Ray: which attempt to start next and when (hedging, the
ladder, breakers, throttle), how a run's time and tokens are shared among its steps, and the budget's
buckets, leases, priority and admission. Every method takes `now`; tests drive them with tables."""

from tailrace.policies.attempts import AttemptFeedback, AttemptPolicy, AttemptState, Decision, GiveUp, Start
from tailrace.policies.budget_config import BudgetConfig, LimitSpec, TenantBudget
from tailrace.policies.hedging import HedgingPolicy, TailState, TailTuning
from tailrace.policies.spend import Grant, Refusal, RunCostGate, SpendAsk, SpendGate, Usage

__all__ = [
    "AttemptFeedback",
    "AttemptPolicy",
    "AttemptState",
    "BudgetConfig",
    "Decision",
    "GiveUp",
    "Grant",
    "HedgingPolicy",
    "LimitSpec",
    "Refusal",
    "RunCostGate",
    "SpendAsk",
    "SpendGate",
    "Start",
    "TailState",
    "TailTuning",
    "TenantBudget",
    "Usage",
]
