"""The user code a workflow names, and whether this process can use it.

A spec names user code in two places: custom validators (a registered name, or an import path
`"pkg.module:function"`) and schema models (an import path `"pkg.module:ClassName"`, or the class
itself from Python). Prompt variants, systems and schemas are text and travel with the spec. The
driver lists the references (`code_refs`) and every executor checks them where it runs
(`unresolved`) before the first run, so a name an executor cannot resolve stops the batch with the
field, the name and the executor's node instead of failing every answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tailrace.engine.errors import SpecError
from tailrace.engine.specs import WorkflowSpec
from tailrace.engine.validation import resolve_schema_model, resolve_validator, schema_model_ref

CodeKind = Literal["validator", "schema_model"]


@dataclass(frozen=True)
class CodeRef:
    field: str  # e.g. steps[classify].output.validators[0]
    kind: CodeKind
    name: str  # a registered validator name, or "package.module:attribute"


def code_refs(workflow: WorkflowSpec) -> list[CodeRef]:
    """Every piece of user code the workflow names, in spec order."""
    refs = []
    for step in workflow.steps:
        where = f"steps[{step.id}].output"
        model = step.output.schema_model
        if model is not None:
            name = model if isinstance(model, str) else schema_model_ref(model)
            refs.append(CodeRef(f"{where}.schema_model", "schema_model", name))
        for i, name in enumerate(step.output.validators):
            refs.append(CodeRef(f"{where}.validators[{i}]", "validator", name))
    return refs


def unresolved(refs: list[CodeRef]) -> list[tuple[CodeRef, str]]:
    """The references this process cannot resolve, each with why. Schema models first: importing one
    may register validators (a module that registers at import time)."""
    problems = []
    for ref in sorted(refs, key=lambda r: r.kind != "schema_model"):
        try:
            if ref.kind == "schema_model":
                resolve_schema_model(ref.name)
            else:
                resolve_validator(ref.name)
        except SpecError as exc:
            problems.append((ref, exc.message))
    return problems
