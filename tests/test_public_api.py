"""Pins the names users may import from each package, so a change to them is a deliberate one."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import tailrace

PUBLIC = {
    "tailrace": [
        "AttemptOutcome", "AttemptRecord", "BatchConfig", "BatchSummary", "BudgetConfig", "CancelReason",
        "ConfigurationError", "Engine", "EngineConfig", "FailureReason", "HedgeConfig", "InputError", "LimitSpec",
        "ModelChoice", "OutputContract", "PoolConfig", "Prediction", "ProviderConfigError", "ProviderSpec",
        "RunOptions", "RunOutcome", "SpecError", "SpecErrors", "StepResult", "StepSpec", "TailTuning",
        "TailraceError", "TenantBudget", "TraceConfig", "TuneResult", "WhatIf", "WorkflowSpec", "budget_status",
        "load_inputs", "load_workflow", "register_validator", "run_batch", "tune", "what_if", "workflow_from_dict",
    ],
    "tailrace.engine": [
        "AttemptOutcome", "AttemptRecord", "CancelReason", "Clock", "Dag", "Deadline", "ErrorKind",
        "FailureReason", "FakeClock", "InputError", "ModelChoice", "OutputContract", "ProviderConfigError",
        "ProviderError", "ProviderSpec", "RunOptions", "RunOutcome", "SpecError", "SpecErrors", "StepResult",
        "StepSpec", "StopKind", "SystemClock", "TailraceError", "Verdict", "WorkflowSpec", "load_inputs",
        "load_workflow", "register_validator", "validate", "workflow_from_dict",
    ],
    "tailrace.policies": [
        "AttemptFeedback", "AttemptPolicy", "AttemptState", "BudgetConfig", "Decision", "GiveUp", "Grant",
        "HedgingPolicy", "LimitSpec", "Refusal", "RunCostGate", "SpendAsk", "SpendGate", "Start", "TailState",
        "TailTuning", "TenantBudget", "Usage",
    ],
    "tailrace.runtime": [
        "AttemptObserver", "Grant", "Refusal", "RunCostGate", "SpendGate", "StepRequest", "StepRunner", "TailControl",
    ],
    "tailrace.whatif": [
        "Estimate", "Metrics", "Prediction", "Replay", "ReplayPlan", "SampledAdapter", "SampledProvider", "TraceData",
        "TraceFit", "TuneResult", "WhatIf", "fit_mixture", "fit_trace", "kaplan_meier", "predict", "read_trace",
        "run_on_fake_time", "tune",
    ],
    "tailrace.actors": ["BudgetActor", "BudgetHandle", "LatencyStatsActor", "StepExecutor"],
    "tailrace.cluster": [
        "BatchConfig", "BatchSummary", "Engine", "EngineConfig", "ExecutorPool", "PoolConfig", "TraceConfig",
        "WorkflowDriver", "budget_status", "connect", "run_batch", "start_executors", "tune", "what_if",
    ],
}  # fmt: skip


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_are_pinned_and_resolve(package):
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_the_top_level_api_is_the_same_object_as_where_it_lives():
    from tailrace.cluster.api import run_batch
    from tailrace.engine.specs import WorkflowSpec

    assert tailrace.run_batch is run_batch
    assert tailrace.WorkflowSpec is WorkflowSpec
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = tailrace.nope


def test_import_tailrace_does_not_import_ray():
    # The CLI checks a user's input before Ray is imported or started; the engine is usable without Ray.
    code = (
        "import sys, tailrace, tailrace.engine, tailrace.policies, tailrace.whatif, tailrace.cluster; "
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
