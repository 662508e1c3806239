"""Cost caps: a run's cap split among its steps that run at the same time.

A step's attempts are reserved against the share of the run's cap it was given (`RunCostGate`).
Steps that start together split what is left of the cap (less what running steps already hold) in
proportion to what one attempt of each may cost, so parallel steps cannot together spend more than
the run's cap; a step that runs alone gets everything that is left. Tenants' daily allowances are
buckets of the ledger (`usd:<tenant>:<day>`, see `tailrace.policies.budget_config`).
"""

from __future__ import annotations

from collections.abc import Mapping

from tailrace.engine.specs import StepSpec


def attempt_weight(step: StepSpec) -> float:
    """What one attempt of the step's first model may cost at most (prompt sized like max_tokens)."""
    first = step.models[0]
    return max(first.cost_usd(first.max_tokens, first.max_tokens), 1e-12)


def split_cost(unpromised_usd: float, weights: Mapping[str, float]) -> dict[str, float]:
    """Shares of `unpromised_usd` for steps starting together, proportional to their weights."""
    total = sum(weights.values())
    if not weights:
        return {}
    if total <= 0:
        return {step: unpromised_usd / len(weights) for step in weights}
    return {step: max(0.0, unpromised_usd) * w / total for step, w in weights.items()}
