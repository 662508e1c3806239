"""tailrace's Ray-free core: specs, DAG, templates, validation, clock and deadlines, typed outcomes,
provider adapters and error classification. The provider simulator lives in `tailrace.engine.sim`."""

from tailrace.engine.clock import Clock, Deadline, FakeClock, SystemClock
from tailrace.engine.dag import Dag
from tailrace.engine.errors import InputError, ProviderConfigError, SpecError, SpecErrors, TailraceError
from tailrace.engine.loading import load_inputs, load_workflow, workflow_from_dict
from tailrace.engine.outcomes import (
    AttemptOutcome,
    AttemptRecord,
    CancelReason,
    ErrorKind,
    FailureReason,
    ProviderError,
    RunOutcome,
    StepResult,
    StopKind,
)
from tailrace.engine.specs import ModelChoice, OutputContract, ProviderSpec, RunOptions, StepSpec, WorkflowSpec
from tailrace.engine.validation import Verdict, register_validator, validate

__all__ = [
    "AttemptOutcome",
    "AttemptRecord",
    "CancelReason",
    "Clock",
    "Dag",
    "Deadline",
    "ErrorKind",
    "FailureReason",
    "FakeClock",
    "InputError",
    "ModelChoice",
    "OutputContract",
    "ProviderConfigError",
    "ProviderError",
    "ProviderSpec",
    "RunOptions",
    "RunOutcome",
    "SpecError",
    "SpecErrors",
    "StepResult",
    "StepSpec",
    "StopKind",
    "SystemClock",
    "TailraceError",
    "Verdict",
    "WorkflowSpec",
    "load_inputs",
    "load_workflow",
    "register_validator",
    "validate",
    "workflow_from_dict",
]
