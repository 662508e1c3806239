"""The quality floor: decide whether one model answer satisfies a step's output contract.

`validate` runs the checks in a fixed order and stops at the first failure, so a verdict carries
one short machine-friendly reason (`truncated`, `not_json`, `schema: ...`, `validator:<name>: ...`).
It never raises for a bad answer: a validator that raises is reported as a failed check.

JSON answers: the whole answer must be one JSON value, optionally wrapped in a single markdown
fence (```json ... ```), because real models emit fences even when told not to and the content is
unambiguous. Prose around the JSON, or several blocks, is `not_json`: guessing which part the
model meant would let a wrong answer through. NaN and Infinity are not JSON and are rejected.

Custom validators are named in a contract either by a name registered with `register_validator` or
by import path (`"pkg.module:function"`, like `schema_model`). Validation runs on the step executors,
in other processes and on other nodes: the engine carries the driver's registered validators and
schema model classes to every executor (`tailrace.actors.user_code`), import paths are resolved there,
and whatever an executor cannot resolve stops the batch before its first run.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, overload

import pydantic
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from tailrace.engine.errors import SpecError
from tailrace.engine.outcomes import StopKind
from tailrace.engine.specs import OutputContract

ValidatorFn = Callable[[Any, str, Mapping[str, Any]], str | None]

_STOP_REASONS: dict[StopKind, str] = {
    StopKind.TRUNCATED: "truncated",
    StopKind.REFUSED: "refused",
    StopKind.FILTERED: "filtered",
    StopKind.TOOL: "tool_call",
    StopKind.UNKNOWN: "incomplete",
}
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(?P<body>.*?)\n?[ \t]*```", re.DOTALL)
_MAX_MESSAGE_CHARS = 200
# The opening of a refusal, as models phrase it when the API does not flag it.
_REFUSAL = re.compile(
    r"^(I'm sorry|I am sorry|Sorry|I apologi[sz]e)?[,.]?\s*(but )?I (can(no|')t|am unable to|won't) "
    r"(help|assist|comply|provide|do that)",
    re.IGNORECASE,
)

_registry: dict[str, ValidatorFn] = {}
_registry_lock = threading.Lock()
# Schema model classes the driver shipped to this process, by their "module:QualName" reference: a class
# defined in a user's script cannot be imported here, so it travels by value.
_shipped_models: dict[str, type[pydantic.BaseModel]] = {}


@dataclass(frozen=True)
class Verdict:
    """`value` is the parsed JSON (kind json) or the stripped text; `reason` is None exactly when ok."""

    ok: bool
    value: Any = None
    reason: str | None = None


def validate(contract: OutputContract, text: str, stop_kind: StopKind | None, inputs: Mapping[str, Any]) -> Verdict:
    """Check one answer against `contract`: stop kind, length, JSON, schema, copied ids, validators."""
    if stop_kind != StopKind.COMPLETE:
        return _fail(_STOP_REASONS.get(stop_kind, "incomplete") if stop_kind else "incomplete")
    stripped = text.strip()
    if len(stripped) < contract.min_chars:
        return _fail("empty" if not stripped else "too_short")
    if contract.kind == "text" and _REFUSAL.match(stripped):
        # OpenAI without structured outputs puts a refusal in the content with finish_reason "stop".
        return _fail("refused")
    value: Any = stripped
    if contract.kind == "json":
        parsed = _parse_json(stripped)
        if parsed is _NOT_JSON:
            return _fail("empty" if not stripped else "not_json")
        value = parsed
        if (problem := _schema_problem(contract, value)) is not None:
            return _fail(f"schema: {problem}")
    for field in contract.copy_ids:
        if field not in inputs or not _contains_id(text, str(inputs[field]), contract.kind == "json"):
            return _fail(f"missing_id: {field}")
    for name in contract.validators:
        if (problem := _run_validator(name, value, text, inputs)) is not None:
            return _fail(f"validator:{name}: {problem}")
    return Verdict(ok=True, value=value)


def contract_instructions(contract: OutputContract, inputs: Mapping[str, Any]) -> str:
    """The output contract as system-prompt text, in the convention the provider simulator reads.

    The schema goes between `<schema>` and `</schema>` as compact JSON, the identifiers to copy as
    a JSON list between `<ids>` and `</ids>`. "" for a plain text contract without ids.
    """
    parts: list[str] = []
    if contract.kind == "json":
        schema = contract_schema(contract)
        if schema is None:
            parts.append("Respond with a single JSON value, with no other text.")
        else:
            parts.append(
                "Respond with a single JSON object that conforms to this JSON Schema, with no other text:\n"
                f"<schema>{_compact_schema(schema)}</schema>"
            )
    ids = [str(inputs[f]) for f in contract.copy_ids if f in inputs]
    if ids:
        parts.append(f"Copy these identifiers verbatim into your answer:\n<ids>{_compact(ids)}</ids>")
    return "\n\n".join(parts)


def contract_schema(contract: OutputContract) -> dict[str, Any] | None:
    """The JSON Schema a JSON answer must satisfy: `json_schema`, else the schema model's schema."""
    if contract.json_schema is not None:
        return contract.json_schema
    if contract.schema_model is not None:
        return resolve_schema_model(contract.schema_model).model_json_schema()
    return None


def resolve_schema_model(ref: Any) -> type[pydantic.BaseModel]:
    """A pydantic model class from a class or a "package.module:ClassName" string (one shipped to this
    process, else imported).

    Raises `SpecError` (field `output.schema_model`) when it cannot be imported or is no model.
    """
    if isinstance(ref, str):
        shipped = _shipped_models.get(ref)
        return shipped if shipped is not None else _import_model(ref)
    if isinstance(ref, type) and issubclass(ref, pydantic.BaseModel):
        return ref
    raise SpecError("output.schema_model", f"{ref!r} is not a pydantic BaseModel subclass")


@overload
def register_validator(name: str, *, replace: bool = False) -> Callable[[ValidatorFn], ValidatorFn]: ...


@overload
def register_validator(name: str, fn: ValidatorFn, *, replace: bool = False) -> ValidatorFn: ...


def register_validator(
    name: str, fn: ValidatorFn | None = None, *, replace: bool = False
) -> ValidatorFn | Callable[[ValidatorFn], ValidatorFn]:
    """Register `fn(value, text, inputs) -> reason | None` under `name`; usable as a decorator.

    Registering a different function under a taken name raises `ValueError` unless `replace=True`
    (re-registering the same function, e.g. on a module re-import, is allowed).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a validator name must be a non-empty string")

    def add(f: ValidatorFn) -> ValidatorFn:
        with _registry_lock:
            old = _registry.get(name)
            if old is not None and old is not f and not replace:
                raise ValueError(f"validator {name!r} is already registered (pass replace=True)")
            _registry[name] = f
        return f

    return add if fn is None else add(fn)


def resolve_validator(name: str) -> ValidatorFn:
    """The validator a contract names: a registered name, else an import path "pkg.module:function".

    Raises `SpecError` (field `output.validators`) when it is neither.
    """
    fn = _registry.get(name)  # one dict read is atomic; no lock needed on the hot path
    if fn is not None:
        return fn
    if ":" not in name:
        raise SpecError(
            "output.validators",
            f"validator {name!r} is not registered in this process: register it with "
            "tailrace.register_validator (before the engine starts) or name it by import path "
            "'package.module:function'",
        )
    return _import_validator(name)


def schema_model_ref(model: type[pydantic.BaseModel]) -> str:
    """The "module:QualName" reference of a model class (how a spec names it as text)."""
    return f"{model.__module__}:{model.__qualname__}"


def install_shipped(validators: Mapping[str, ValidatorFn], models: Mapping[str, type[pydantic.BaseModel]]) -> None:
    """Make the driver's validators and schema model classes usable in this (executor) process."""
    with _registry_lock:
        _registry.update(validators)
        _shipped_models.update(models)


def unregister_validator(name: str) -> None:
    """Remove a validator; unknown names are ignored."""
    with _registry_lock:
        _registry.pop(name, None)


def registered_validators() -> dict[str, ValidatorFn]:
    """A snapshot of the registry, by name."""
    with _registry_lock:
        return dict(_registry)


_NOT_JSON = object()


def _fail(reason: str) -> Verdict:
    return Verdict(ok=False, reason=reason)


def _parse_json(stripped: str) -> Any:
    fenced = _FENCE.fullmatch(stripped)
    body = fenced["body"] if fenced else stripped
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except ValueError:  # json.JSONDecodeError and our NaN/Infinity rejection
        return _NOT_JSON


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _schema_problem(contract: OutputContract, value: Any) -> str | None:
    if contract.json_schema is not None:
        validator = _schema_validator(_canonical(contract.json_schema))
        error = best_match(validator.iter_errors(value))
        if error is not None:
            return _short(f"{error.json_path}: {error.message}")
    if contract.schema_model is not None:
        try:
            resolve_schema_model(contract.schema_model).model_validate(value)
        except pydantic.ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            return _short(f"{where or '$'}: {first['msg']}")
    return None


# A contract's schema is one dict, rendered into every prompt and checked on every answer: its JSON is
# kept by the dict's identity (the dict is held, so its id cannot be reused while it is cached).
_SCHEMA_TEXT: dict[tuple[int, bool], tuple[dict[str, Any], str]] = {}


def _schema_text(schema: dict[str, Any], canonical: bool) -> str:
    key = (id(schema), canonical)
    found = _SCHEMA_TEXT.get(key)
    if found is not None and found[0] is schema:
        return found[1]
    text = json.dumps(schema, sort_keys=True) if canonical else _compact(schema)
    if len(_SCHEMA_TEXT) >= 256:
        _SCHEMA_TEXT.clear()
    _SCHEMA_TEXT[key] = (schema, text)
    return text


def _canonical(schema: dict[str, Any]) -> str:
    return _schema_text(schema, canonical=True)


def _compact_schema(schema: dict[str, Any]) -> str:
    return _schema_text(schema, canonical=False)


@functools.lru_cache(maxsize=256)
def _schema_validator(canonical_schema: str) -> Validator:
    # Keyed by the schema's canonical JSON: building a validator costs far more than dumping it.
    # No format checker: as in JSON Schema 2020-12, `format` is an annotation, not an assertion.
    schema = json.loads(canonical_schema)
    return validator_for(schema, default=Draft202012Validator)(schema)


def _contains_id(text: str, ident: str, json_text: bool) -> bool:
    if ident in text:
        return True
    # Inside JSON an id with quotes, backslashes or non-ASCII can appear escaped; that is still a
    # verbatim copy of the value.
    return json_text and json.dumps(ident)[1:-1] in text


def _run_validator(name: str, value: Any, text: str, inputs: Mapping[str, Any]) -> str | None:
    try:
        fn = resolve_validator(name)
    except SpecError as exc:
        return "not registered" if ":" not in name else _short(exc.message)
    try:
        result = fn(value, text, inputs)
    except Exception as exc:  # a user's validator must never crash the attempt; report it instead
        return _short(f"raised {type(exc).__name__}: {exc}")
    if result is None:
        return None
    if isinstance(result, str):
        return _short(result) or "invalid"
    return f"returned {type(result).__name__}, expected a reason string or None"


@functools.lru_cache(maxsize=64)
def _import_model(ref: str) -> type[pydantic.BaseModel]:
    obj = _import_attribute(ref, "output.schema_model", "package.module:ClassName")
    if not (isinstance(obj, type) and issubclass(obj, pydantic.BaseModel)):
        raise SpecError("output.schema_model", f"{ref!r} is not a pydantic BaseModel subclass")
    return obj


@functools.lru_cache(maxsize=64)
def _import_validator(ref: str) -> ValidatorFn:
    obj = _import_attribute(ref, "output.validators", "package.module:function")
    if not callable(obj):
        raise SpecError("output.validators", f"cannot use {ref!r}: it is not callable")
    return obj  # type: ignore[no-any-return]


def _import_attribute(ref: str, field: str, form: str) -> Any:
    module_name, sep, qualname = ref.partition(":")
    if not sep or not module_name or not qualname:
        raise SpecError(field, f"{ref!r} is not of the form {form!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # importing runs arbitrary module code; any failure means "cannot import"
        raise SpecError(field, f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for attr in qualname.split("."):
        if not hasattr(obj, attr):
            raise SpecError(field, f"cannot import {ref!r}: module {module_name!r} has no attribute {qualname!r}")
        obj = getattr(obj, attr)
    return obj


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[: _MAX_MESSAGE_CHARS - 3] + "..."
