"""Cross-field checks of a workflow spec, run from `WorkflowSpec`'s validator.

Pydantic checks each field on its own (types, `gt=0`, unknown keys); this module checks what needs
the whole spec: step ids, dependencies and cycles, template references, providers, output
contracts. It collects every problem before raising, so one run of a bad spec lists all of them,
each under a field path that names steps by id (`steps[summarize].models[1].provider`).

`SpecErrors` is not a ValueError on purpose: pydantic passes it through a model validator unchanged
instead of folding it into a ValidationError with positional paths.

Whether the custom validators a contract names are registered is checked at run start
(`check_validators_registered`), since user code may register them after the spec is loaded; every
executor then checks that it can resolve them (`tailrace.engine.user_code`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from tailrace.engine.dag import ancestors_of, find_cycle
from tailrace.engine.errors import SpecError, SpecErrors
from tailrace.engine.templates import TemplateError, TemplateRef, references
from tailrace.engine.validation import registered_validators, resolve_schema_model

if TYPE_CHECKING:
    from tailrace.engine.specs import OutputContract, StepSpec, WorkflowSpec


def check_workflow(spec: WorkflowSpec) -> None:
    """Raise `SpecErrors` listing every cross-field problem of `spec`; return None when there is none."""
    errors = [
        *_check_inputs(spec),
        *_check_ids(spec),
        *_check_graph(spec),
    ]
    for step in spec.steps:
        errors += _check_models(spec, step)
        errors += _check_templates(spec, step)
        errors += _check_output(spec, step)
    if errors:
        raise SpecErrors(errors)


def check_validators_registered(spec: WorkflowSpec) -> None:
    """Raise `SpecErrors` when an output contract names a custom validator that is neither registered in
    this (the driver's) process nor an import path. Import paths are resolved where validation runs: on
    every executor, before the first run."""
    known = registered_validators()
    errors = [
        SpecError(
            f"steps[{step.id}].output.validators[{i}]",
            f"validator {name!r} is not registered; registered: {_listing(known)} (register it with "
            "tailrace.register_validator before the batch starts, or name it by import path "
            "'package.module:function')",
        )
        for step in spec.steps
        for i, name in enumerate(step.output.validators)
        if name not in known and ":" not in name
    ]
    if errors:
        raise SpecErrors(errors)


def _check_inputs(spec: WorkflowSpec) -> list[SpecError]:
    seen: set[str] = set()
    errors = []
    for i, name in enumerate(spec.inputs):
        if name in seen:
            errors.append(SpecError(f"inputs[{i}]", f"input field {name!r} is listed twice"))
        seen.add(name)
    return errors


def _check_ids(spec: WorkflowSpec) -> list[SpecError]:
    first: dict[str, int] = {}
    errors = []
    for i, step in enumerate(spec.steps):
        if step.id in first:
            errors.append(
                SpecError(
                    f"steps[{step.id}].id",
                    f"duplicate step id {step.id!r} (steps {first[step.id]} and {i}, counting from 0)",
                )
            )
        else:
            first[step.id] = i
    return errors


def _check_graph(spec: WorkflowSpec) -> list[SpecError]:
    return check_graph([(s.id, s.depends_on) for s in spec.steps])


def check_graph(steps: Sequence[tuple[str, Sequence[str]]]) -> list[SpecError]:
    """Dependency problems of (step id, depends_on) pairs: also used on raw specs that failed
    field validation, so a cycle is reported together with the field errors."""
    ids = [step_id for step_id, _ in steps]
    known = set(ids)
    errors = []
    for step_id, depends_on in steps:
        for j, dep in enumerate(depends_on):
            where = f"steps[{step_id}].depends_on[{j}]"
            if dep == step_id:
                errors.append(SpecError(where, "a step cannot depend on itself"))
            elif dep not in known:
                errors.append(SpecError(where, f"unknown step {dep!r}; steps are: {_listing(ids)}"))
            elif dep in depends_on[:j]:
                errors.append(SpecError(where, f"step {dep!r} is listed twice"))
    # Walk the edges the way data flows (dependency -> dependent) so the cycle reads like the
    # workflow: `a -> b` means b depends on a. Self-dependencies are reported above, not as cycles.
    feeds: dict[str, list[str]] = {i: [] for i in ids}
    for step_id, depends_on in steps:
        for dep in dict.fromkeys(depends_on):
            if dep in feeds and dep != step_id:
                feeds[dep].append(step_id)
    cycle = find_cycle(feeds)
    if cycle is not None:
        head, last = cycle[0], cycle[-2]
        # `head` depends on `last`; with duplicate ids, pick the declaration that has that edge.
        owner = next(deps for step_id, deps in steps if step_id == head and last in deps)
        j = list(owner).index(last)
        errors.append(
            SpecError(
                f"steps[{head}].depends_on[{j}]",
                "cycle: " + " -> ".join(cycle) + " (x -> y: y depends on x)",
            )
        )
    return errors


def _check_models(spec: WorkflowSpec, step: StepSpec) -> list[SpecError]:
    if not step.models:
        return [SpecError(f"steps[{step.id}].models", "at least one model is required")]
    providers = spec.all_providers()
    return [
        SpecError(
            f"steps[{step.id}].models[{k}].provider",
            f"unknown provider {model.provider!r}; known providers: {_listing(providers)}",
        )
        for k, model in enumerate(step.models)
        if model.provider not in providers
    ]


def _check_templates(spec: WorkflowSpec, step: StepSpec) -> list[SpecError]:
    fields: list[tuple[str, str | None]] = [
        (f"steps[{step.id}].prompt", step.prompt),
        (f"steps[{step.id}].system", step.system),
    ]
    for k, model in enumerate(step.models):
        fields.append((f"steps[{step.id}].models[{k}].prompt", model.prompt))
        fields.append((f"steps[{step.id}].models[{k}].system", model.system))
    # A template may use any step this one depends on, directly or not: all are done before it runs.
    # (With duplicate ids the first declaration stands for the id, hence `reversed`.)
    parents = {s.id: s.depends_on for s in reversed(spec.steps)}
    usable = ancestors_of({**parents, step.id: step.depends_on}, step.id)
    errors = []
    for where, template in fields:
        if template is None:
            continue
        try:
            refs = references(template)
        except TemplateError as exc:
            errors.append(SpecError(where, str(exc)))
            continue
        for ref in dict.fromkeys(refs):  # one error per distinct reference
            if (problem := _reference_problem(spec, step, usable, ref)) is not None:
                errors.append(SpecError(where, f"{{{{{ref}}}}}: {problem}"))
    return errors


def _reference_problem(spec: WorkflowSpec, step: StepSpec, usable: set[str], ref: TemplateRef) -> str | None:
    name = ref.name
    if ref.source == "input":
        if name not in spec.inputs:
            return f"unknown input field {name!r}; declared inputs: {_listing(spec.inputs)}"
        return None
    ids = [s.id for s in spec.steps]
    if name == step.id:
        return "a step cannot use its own output"
    if name not in ids:
        return f"unknown step {name!r}; steps are: {_listing(ids)}"
    if name not in usable:
        return (
            f"step {name!r} is not in this step's depends_on (directly or through its dependencies); "
            "add it there to use its output"
        )
    if ref.path and spec.step(name).output.kind != "json":
        return f"step {name!r} has a text output; a path into it needs output.kind: json"
    return None


def _check_output(spec: WorkflowSpec, step: StepSpec) -> list[SpecError]:
    out: OutputContract = step.output
    where = f"steps[{step.id}].output"
    errors = [
        SpecError(
            f"{where}.copy_ids[{i}]",
            f"unknown input field {name!r}; declared inputs: {_listing(spec.inputs)}",
        )
        for i, name in enumerate(out.copy_ids)
        if name not in spec.inputs
    ]
    if out.json_schema is not None:
        if out.kind != "json":
            errors.append(SpecError(f"{where}.json_schema", "a JSON Schema needs output.kind: json"))
        else:
            try:
                validator_for(out.json_schema).check_schema(out.json_schema)
            except SchemaError as exc:
                path = "/".join(str(p) for p in exc.path) or "(root)"
                errors.append(SpecError(f"{where}.json_schema", f"invalid JSON Schema at {path}: {exc.message}"))
    if out.schema_model is not None:
        if out.kind != "json":
            errors.append(SpecError(f"{where}.schema_model", "a schema model needs output.kind: json"))
        try:
            resolve_schema_model(out.schema_model)
        except SpecError as exc:
            errors.append(SpecError(f"{where}.schema_model", exc.message))
    return errors


def _listing(names: Iterable[str]) -> str:
    items = list(dict.fromkeys(names))
    return ", ".join(items) if items else "(none)"
