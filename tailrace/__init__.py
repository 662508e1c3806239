"""tailrace: deliver a *valid* LLM workflow result *on time*, inside a cost margin and a shared quota.

The public API. Everything a user imports comes from here; the sub-packages are the rooms behind it:
`tailrace.engine` (Ray-free core: specs, deadlines, validation, adapters, simulator),
`tailrace.policies` (pure decisions on fake time), `tailrace.runtime` (the Ray-free executor runtime:
step runner, tail control, spend gates), `tailrace.whatif` (replaying a trace on fake time to predict a
policy), `tailrace.actors` (the Ray actors) and `tailrace.cluster` (the driver, batches, jobs, the CLI).
Names resolve lazily, so `import tailrace` does not import Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tailrace.engine._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # running workflows
    "run_batch": "tailrace.cluster.api",
    "Engine": "tailrace.cluster.engine",
    "EngineConfig": "tailrace.cluster.config",
    "BatchConfig": "tailrace.cluster.config",
    "BatchSummary": "tailrace.cluster.results",
    "PoolConfig": "tailrace.cluster.pool",
    "TraceConfig": "tailrace.cluster.trace",
    "budget_status": "tailrace.cluster.budget",
    # predicting a policy from a trace
    "what_if": "tailrace.cluster.whatif",
    "tune": "tailrace.cluster.whatif",
    "WhatIf": "tailrace.whatif.change",
    "Prediction": "tailrace.whatif.prediction",
    "TuneResult": "tailrace.whatif.search",
    # specs and options
    "load_workflow": "tailrace.engine.loading",
    "load_inputs": "tailrace.engine.loading",
    "workflow_from_dict": "tailrace.engine.loading",
    "WorkflowSpec": "tailrace.engine.specs",
    "StepSpec": "tailrace.engine.specs",
    "ModelChoice": "tailrace.engine.specs",
    "OutputContract": "tailrace.engine.specs",
    "ProviderSpec": "tailrace.engine.specs",
    "RunOptions": "tailrace.engine.specs",
    "HedgeConfig": "tailrace.engine.specs",
    "TailTuning": "tailrace.policies.hedging",
    "BudgetConfig": "tailrace.policies.budget_config",
    "LimitSpec": "tailrace.policies.budget_config",
    "TenantBudget": "tailrace.policies.budget_config",
    "register_validator": "tailrace.engine.validation",
    # outcomes
    "RunOutcome": "tailrace.engine.outcomes",
    "StepResult": "tailrace.engine.outcomes",
    "AttemptRecord": "tailrace.engine.outcomes",
    "AttemptOutcome": "tailrace.engine.outcomes",
    "FailureReason": "tailrace.engine.outcomes",
    "CancelReason": "tailrace.engine.outcomes",
    # errors
    "TailraceError": "tailrace.engine.errors",
    "ConfigurationError": "tailrace.engine.errors",
    "SpecError": "tailrace.engine.errors",
    "SpecErrors": "tailrace.engine.errors",
    "InputError": "tailrace.engine.errors",
    "ProviderConfigError": "tailrace.engine.errors",
}

__all__ = [
    "AttemptOutcome",
    "AttemptRecord",
    "BatchConfig",
    "BatchSummary",
    "BudgetConfig",
    "CancelReason",
    "ConfigurationError",
    "Engine",
    "EngineConfig",
    "FailureReason",
    "HedgeConfig",
    "InputError",
    "LimitSpec",
    "ModelChoice",
    "OutputContract",
    "PoolConfig",
    "Prediction",
    "ProviderConfigError",
    "ProviderSpec",
    "RunOptions",
    "RunOutcome",
    "SpecError",
    "SpecErrors",
    "StepResult",
    "StepSpec",
    "TailTuning",
    "TailraceError",
    "TenantBudget",
    "TraceConfig",
    "TuneResult",
    "WhatIf",
    "WorkflowSpec",
    "budget_status",
    "load_inputs",
    "load_workflow",
    "register_validator",
    "run_batch",
    "tune",
    "what_if",
    "workflow_from_dict",
]


__getattr__, _ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


if TYPE_CHECKING:
    from tailrace.cluster.api import run_batch
    from tailrace.cluster.budget import budget_status
    from tailrace.cluster.config import BatchConfig, EngineConfig
    from tailrace.cluster.engine import Engine
    from tailrace.cluster.pool import PoolConfig
    from tailrace.cluster.results import BatchSummary
    from tailrace.cluster.trace import TraceConfig
    from tailrace.cluster.whatif import tune, what_if
    from tailrace.engine.errors import (
        ConfigurationError,
        InputError,
        ProviderConfigError,
        SpecError,
        SpecErrors,
        TailraceError,
    )
    from tailrace.engine.loading import load_inputs, load_workflow, workflow_from_dict
    from tailrace.engine.outcomes import (
        AttemptOutcome,
        AttemptRecord,
        CancelReason,
        FailureReason,
        RunOutcome,
        StepResult,
    )
    from tailrace.engine.specs import (
        HedgeConfig,
        ModelChoice,
        OutputContract,
        ProviderSpec,
        RunOptions,
        StepSpec,
        WorkflowSpec,
    )
    from tailrace.engine.validation import register_validator
    from tailrace.policies.budget_config import BudgetConfig, LimitSpec, TenantBudget
    from tailrace.policies.hedging import TailTuning
    from tailrace.whatif.change import WhatIf
    from tailrace.whatif.prediction import Prediction
    from tailrace.whatif.search import TuneResult
