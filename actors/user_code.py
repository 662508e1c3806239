"""User code on the step executors: how the driver's validators and schema models reach them.

The way Ray ships a task's function: the driver pickles each validator registered under a name the
workflow uses, and each schema model class a spec holds, with Ray's cloudpickle. A function or class
defined in the user's script (`__main__`) travels by value; one defined in a module travels as a
reference to it, so that module must be importable where the executor runs: ship it with the
executors (`EngineConfig.user_modules`, Ray's runtime_env `py_modules` or `working_dir`; a job's
working directory travels by itself). Import paths in a spec (`"pkg.module:attribute"`) are imported
on the executor, under the same rule.

Every executor installs what it was given at start-up (and what later workflows add, through
`preflight`), and answers `preflight` with whatever it cannot resolve, naming itself and its node.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from ray import cloudpickle

from tailrace.engine.specs import WorkflowSpec
from tailrace.engine.user_code import CodeRef, unresolved
from tailrace.engine.validation import install_shipped, registered_validators, schema_model_ref

SHIP_HINT = (
    "ship the module that defines it with the executors: EngineConfig(user_modules=[...]) / "
    "BatchConfig(user_modules=[...]), or Ray's runtime_env py_modules or working_dir"
)


def capture(workflow: WorkflowSpec, shipped: MutableMapping[str, bytes]) -> WorkflowSpec:
    """Pickle what `workflow` names from the driver into `shipped` ("validator:NAME",
    "schema_model:module:Class"); the spec as executors get it, with schema model classes as references."""
    known = registered_validators()
    steps = []
    for step in workflow.steps:
        for name in step.output.validators:
            if name in known:
                shipped[f"validator:{name}"] = cloudpickle.dumps(known[name])
        model = step.output.schema_model
        if isinstance(model, type):
            ref = schema_model_ref(model)
            shipped[f"schema_model:{ref}"] = cloudpickle.dumps(model)
            step = step.model_copy(update={"output": step.output.model_copy(update={"schema_model": ref})})
        steps.append(step)
    return workflow.model_copy(update={"steps": steps})


def install(shipped: Mapping[str, bytes]) -> dict[str, str]:
    """Load and install shipped code in this process; what could not be loaded, by key, and why."""
    validators: dict[str, Any] = {}
    models: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for key, blob in shipped.items():
        kind, _, name = key.partition(":")
        try:
            obj = cloudpickle.loads(blob)
        except Exception as exc:  # unpickling imports the user's modules: any failure is theirs to fix
            what = "validator" if kind == "validator" else "schema model"
            problems[key] = f"{what} {name!r} cannot be loaded here ({type(exc).__name__}: {exc}): {SHIP_HINT}"
            continue
        (validators if kind == "validator" else models)[name] = obj
    install_shipped(validators, models)
    return problems


def check(refs: list[CodeRef], load_problems: Mapping[str, str]) -> list[tuple[CodeRef, str]]:
    """The references this process cannot use: a shipped object that did not load, else a name that
    does not resolve here."""
    failed = [(r, load_problems[f"{r.kind}:{r.name}"]) for r in refs if f"{r.kind}:{r.name}" in load_problems]
    seen = {r for r, _ in failed}
    for ref, problem in unresolved([r for r in refs if r not in seen]):
        if repr(ref.name) not in problem:
            problem = f"{ref.kind.replace('_', ' ')} {ref.name!r}: {problem}"
        if "cannot import" in problem:
            problem += f"; {SHIP_HINT}"
        failed.append((ref, problem))
    return failed
