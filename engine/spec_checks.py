"""Cross-field checks of a workflow spec, run from `WorkflowSpec`'s validator.

Pydantic checks each field on its own (types, `gt=0`, unknown keys); this module checks what needs
the whole spec: step ids, dependencies and cycles, template references, providers, output
contracts. It collects every problem before raising, so one run of a bad spec lists all of them,
each under a field path that names steps by id (`steps[summarize].models[1].provider`).

`SpecErrors` is not a ValueError on purpose: pydantic passes it through a model validator unchanged
instead of folding it into a ValidationError with positional paths.

Whether the custom validators a contract names are registered is checked at run start
(`check_validators_registered`), since user code may register them after the spec is loaded. So is a
schema model named by import path (`check_schema_models`): loading a spec never imports or runs code,
only checks the path's form. Every executor then checks that it can
resolve the validators (`tailrace.engine.user_code`).

Every check is linear in the size of the spec (a 1,000-step chain loads in milliseconds): ancestor
sets are bitsets built once in topological order, lookups are dicts.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from tailrace.engine.dag import find_cycle
from tailrace.engine.errors import SpecError, SpecErrors
from tailrace.engine.templates import TemplateError, TemplateRef, references
from tailrace.engine.validation import registered_validators, resolve_schema_model

if TYPE_CHECKING:
    from tailrace.engine.specs import OutputContract, StepSpec, WorkflowSpec


_LISTED_NAMES = 20
# "package.module:ClassName" (dotted identifiers on both sides)
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_IMPORT_PATH = re.compile(f"{_DOTTED}:{_DOTTED}")
SCHEMA_MODULES_ENV = "TAILRACE_SCHEMA_MODULES"


def check_workflow(spec: WorkflowSpec) -> None:
    """Raise `SpecErrors` listing every cross-field problem of `spec`; return None when there is none."""
    errors = [
        *_check_inputs(spec),
        *_check_ids(spec),
        *_check_graph(spec),
    ]
    view = _SpecView(spec)
    for step in spec.steps:
        errors += _check_models(view, step)
        errors += _check_templates(view, step)
        errors += _check_output(spec, step)
    if errors:
        raise SpecErrors(errors)


class _SpecView:
    """What the per-step checks look up, built once: ids, steps by id, providers, ancestor bitsets."""

    def __init__(self, spec: WorkflowSpec) -> None:
        self.spec = spec
        self.ids = [s.id for s in spec.steps]
        self.by_id: dict[str, StepSpec] = {}
        for s in spec.steps:
            self.by_id.setdefault(s.id, s)  # with duplicate ids the first declaration stands for the id
        self.index = {step_id: i for i, step_id in enumerate(self.by_id)}
        self.providers = spec.all_providers()
        self._ancestors: dict[str, int] | None = None

    def usable(self, step: StepSpec) -> int:
        """Bitset (by `index`) of every step `step` depends on, directly or not: a template may use
        any of them, since all are done before it runs."""
        if self._ancestors is None:
            self._ancestors = self._ancestor_bits()
        bits = 0
        for dep in step.depends_on:
            if dep in self.index and dep != step.id:
                bits |= self._ancestors.get(dep, 0) | (1 << self.index[dep])
        return bits

    def _ancestor_bits(self) -> dict[str, int]:
        # Kahn's order over the first declarations; steps on a cycle (an error reported elsewhere)
        # get the ancestors found before the cycle, which is enough to report their references.
        parents = {
            i: [d for d in dict.fromkeys(s.depends_on) if d in self.index and d != i] for i, s in self.by_id.items()
        }
        children: dict[str, list[str]] = {i: [] for i in parents}
        waiting = {i: len(ps) for i, ps in parents.items()}
        for i, ps in parents.items():
            for p in ps:
                children[p].append(i)
        ready = [i for i, n in waiting.items() if n == 0]
        bits: dict[str, int] = {}
        while ready:
            node = ready.pop()
            mask = 0
            for p in parents[node]:
                mask |= bits.get(p, 0) | (1 << self.index[p])
            bits[node] = mask
            for c in children[node]:
                waiting[c] -= 1
                if waiting[c] == 0:
                    ready.append(c)
        return bits


def check_schema_models(spec: WorkflowSpec, allowed: Iterable[str] = ()) -> None:
    """Resolve every schema model a spec names by import path; raise `SpecErrors` naming each that
    cannot be used. Run at run start, never at load: it imports the module.

    Only modules the user allowed are imported: one already imported in this process (the user's
    code did it), one the user ships with the executors (`allowed`: module names, e.g. the modules
    beside a workflow file it runs), or one listed, by name or package prefix, in
    `TAILRACE_SCHEMA_MODULES` (comma-separated). From Python, pass the model class itself.
    """
    shipped = set(allowed)
    errors = []
    for step in spec.steps:
        ref = step.output.schema_model
        if not isinstance(ref, str):
            continue
        where = f"steps[{step.id}].output.schema_model"
        module = ref.partition(":")[0]
        if module.split(".")[0] not in shipped and not schema_module_allowed(module):
            errors.append(
                SpecError(
                    where,
                    f"module {module!r} is not allowed to be imported for a schema model: import it first, "
                    f"list it in {SCHEMA_MODULES_ENV}, or pass the model class from Python",
                )
            )
            continue
        try:
            resolve_schema_model(ref)
        except SpecError as exc:
            errors.append(SpecError(where, exc.message))
    if errors:
        raise SpecErrors(errors)


def allow_schema_modules(modules: Iterable[str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Add `modules` to `TAILRACE_SCHEMA_MODULES` in this process (modules the user shipped, e.g. with a job)."""
    listed = [m.strip() for m in environ.get(SCHEMA_MODULES_ENV, "").split(",") if m.strip()]
    environ[SCHEMA_MODULES_ENV] = ",".join(dict.fromkeys([*listed, *modules]))


def schema_module_allowed(module: str, environ: Mapping[str, str] = os.environ) -> bool:
    """True when `module` is already imported or `TAILRACE_SCHEMA_MODULES` lists it or a package of it."""
    if module in sys.modules:
        return True
    allowed = [m.strip() for m in environ.get(SCHEMA_MODULES_ENV, "").split(",") if m.strip()]
    return any(module == m or module.startswith(m + ".") for m in allowed)


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
        seen: set[str] = set()
        for j, dep in enumerate(depends_on):
            where = f"steps[{step_id}].depends_on[{j}]"
            if dep == step_id:
                errors.append(SpecError(where, "a step cannot depend on itself"))
            elif dep not in known:
                errors.append(SpecError(where, f"unknown step {dep!r}; steps are: {_listing(ids)}"))
            elif dep in seen:
                errors.append(SpecError(where, f"step {dep!r} is listed twice"))
            seen.add(dep)
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


def _check_models(view: _SpecView, step: StepSpec) -> list[SpecError]:
    if not step.models:
        return [SpecError(f"steps[{step.id}].models", "at least one model is required")]
    providers = view.providers
    return [
        SpecError(
            f"steps[{step.id}].models[{k}].provider",
            f"unknown provider {model.provider!r}; known providers: {_listing(providers)}",
        )
        for k, model in enumerate(step.models)
        if model.provider not in providers
    ]


def _check_templates(view: _SpecView, step: StepSpec) -> list[SpecError]:
    fields: list[tuple[str, str | None]] = [
        (f"steps[{step.id}].prompt", step.prompt),
        (f"steps[{step.id}].system", step.system),
    ]
    for k, model in enumerate(step.models):
        fields.append((f"steps[{step.id}].models[{k}].prompt", model.prompt))
        fields.append((f"steps[{step.id}].models[{k}].system", model.system))
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
            if (problem := _reference_problem(view, step, ref)) is not None:
                errors.append(SpecError(where, f"{{{{{ref}}}}}: {problem}"))
    return errors


def _reference_problem(view: _SpecView, step: StepSpec, ref: TemplateRef) -> str | None:
    name = ref.name
    spec = view.spec
    if ref.source == "input":
        if name not in spec.inputs:
            return f"unknown input field {name!r}; declared inputs: {_listing(spec.inputs)}"
        return None
    if name == step.id:
        return "a step cannot use its own output"
    if name not in view.index:
        return f"unknown step {name!r}; steps are: {_listing(view.ids)}"
    # A template may use any step this one depends on, directly or not: all are done before it runs.
    if not (view.usable(step) >> view.index[name]) & 1:
        return (
            f"step {name!r} is not in this step's depends_on (directly or through its dependencies); "
            "add it there to use its output"
        )
    if ref.path and view.by_id[name].output.kind != "json":
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
        if isinstance(out.schema_model, str):
            # Only the form: importing runs the module's code, which loading a spec must never do.
            if not _IMPORT_PATH.fullmatch(out.schema_model):
                shown = out.schema_model[:80]
                errors.append(
                    SpecError(f"{where}.schema_model", f"{shown!r} is not of the form 'package.module:ClassName'")
                )
        else:
            try:
                resolve_schema_model(out.schema_model)  # a class from Python: nothing to import
            except SpecError as exc:
                errors.append(SpecError(f"{where}.schema_model", exc.message))
    return errors


def _listing(names: Iterable[str]) -> str:
    items = list(dict.fromkeys(names))
    if len(items) > _LISTED_NAMES:
        return ", ".join(items[:_LISTED_NAMES]) + f", ... ({len(items):,} in all)"
    return ", ".join(items) if items else "(none)"
