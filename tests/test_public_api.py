"""Pins the names users may import from each package, so a change to them is a deliberate one."""

from __future__ import annotations

import engine


def test_engine_public_names():
    assert sorted(engine.__all__) == sorted([
        "AttemptOutcome", "AttemptRecord", "CancelReason", "Clock", "Dag", "Deadline", "ErrorKind",
        "FailureReason", "FakeClock", "InputError", "ModelChoice", "OutputContract", "ProviderConfigError",
        "ProviderError", "ProviderSpec", "RunOptions", "RunOutcome", "SpecError", "SpecErrors", "StepResult",
        "StepSpec", "StopKind", "SystemClock", "TailraceError", "Verdict", "WorkflowSpec", "load_inputs",
        "load_workflow", "register_validator", "validate", "workflow_from_dict",
    ])
    for name in engine.__all__:
        assert getattr(engine, name) is not None
