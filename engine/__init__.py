"""tailrace's Ray-free core: specs, DAG, templates, validation, clock and deadlines, typed outcomes,
provider adapters and error classification. The provider simulator lives in `tailrace.engine.sim`."""

from __future__ import annotations

from tailrace.engine._lazy import lazy_exports

_EXPORTS = {
    "AttemptOutcome": "tailrace.engine.outcomes",
    "AttemptRecord": "tailrace.engine.outcomes",
    "CancelReason": "tailrace.engine.outcomes",
    "Clock": "tailrace.engine.clock",
    "Dag": "tailrace.engine.dag",
    "Deadline": "tailrace.engine.clock",
    "ErrorKind": "tailrace.engine.outcomes",
    "FailureReason": "tailrace.engine.outcomes",
    "FakeClock": "tailrace.engine.clock",
    "InputError": "tailrace.engine.errors",
    "ModelChoice": "tailrace.engine.specs",
    "OutputContract": "tailrace.engine.specs",
    "ProviderConfigError": "tailrace.engine.errors",
    "ProviderError": "tailrace.engine.outcomes",
    "ProviderSpec": "tailrace.engine.specs",
    "RunOptions": "tailrace.engine.specs",
    "RunOutcome": "tailrace.engine.outcomes",
    "SpecError": "tailrace.engine.errors",
    "SpecErrors": "tailrace.engine.errors",
    "StepResult": "tailrace.engine.outcomes",
    "StepSpec": "tailrace.engine.specs",
    "StopKind": "tailrace.engine.outcomes",
    "SystemClock": "tailrace.engine.clock",
    "TailraceError": "tailrace.engine.errors",
    "Verdict": "tailrace.engine.validation",
    "WorkflowSpec": "tailrace.engine.specs",
    "load_inputs": "tailrace.engine.loading",
    "load_workflow": "tailrace.engine.loading",
    "register_validator": "tailrace.engine.validation",
    "validate": "tailrace.engine.validation",
    "workflow_from_dict": "tailrace.engine.loading",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
