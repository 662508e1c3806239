"""Read workflow specs (YAML or JSON, one meaning) and JSONL input batches, with errors users can act on.

Everything wrong with a spec comes out as `SpecErrors`, each error under a field path that names
steps by id (`steps[summarize].models[0].max_tokens`) rather than pydantic's positional
`steps.2.models.0.max_tokens`. File-level problems (missing file, syntax error, a top level that
is not a mapping) are reported the same way, under the file name (and `:line` for syntax errors).
Problems with a batch of inputs are `InputError`s naming the file and line.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from tailrace.engine.errors import InputError, SpecError, SpecErrors
from tailrace.engine.spec_checks import check_graph
from tailrace.engine.specs import WorkflowSpec

_SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}
# Pydantic error types whose message reads better in spec terms.
_MESSAGES = {"extra_forbidden": "unknown key", "missing": "missing required key"}
_MAX_INPUT_CHARS = 60


def load_workflow(path: str | Path) -> WorkflowSpec:
    """Load a workflow spec from a `.yaml`, `.yml` or `.json` file."""
    path = Path(path)
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise _file_error(str(path), f"unsupported file type {path.suffix!r}; use .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _file_error(str(path), "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _file_error(str(path), f"cannot read: {exc}") from None
    data = _parse_yaml(text, str(path)) if fmt == "YAML" else _parse_json(text, str(path))
    return workflow_from_dict(data, source=str(path))


def workflow_from_dict(data: Any, source: str = "<dict>") -> WorkflowSpec:
    """Build a `WorkflowSpec` from plain data (what YAML or JSON parse to)."""
    if not isinstance(data, Mapping):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise _file_error(source, f"the top level must be a mapping of workflow keys, got {kind}")
    try:
        return WorkflowSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = SpecErrors([_convert(err, data) for err in exc.errors(include_url=False)] + _raw_graph_errors(data))
        errors.add_note(f"in {source}")
        raise errors from None
    except SpecErrors as exc:
        exc.add_note(f"in {source}")
        raise


def load_inputs(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for each non-blank line of a JSONL file, reading lazily."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise InputError(f"{path}:{number}: not valid JSON: {exc}") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{number}: expected a JSON object, got {_json_kind(record)}")
                yield number, record
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None


def check_inputs(spec: WorkflowSpec, record: Mapping[str, Any], line: int, source: str = "") -> None:
    """Raise `InputError` when `record` (from `line` of `source`) lacks a field the spec declares."""
    missing = [name for name in spec.inputs if name not in record]
    if missing:
        where = f"{source}:{line}" if source else f"line {line}"
        raise InputError(f"{where}: missing input field(s): {', '.join(missing)}")


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = exc.problem or exc.context or "syntax error"
        raise _file_error(where, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise _file_error(source, f"YAML error: {exc}") from None


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _file_error(f"{source}:{exc.lineno}", f"JSON syntax error: {exc.msg} (column {exc.colno})") from None


def _file_error(where: str, message: str) -> SpecErrors:
    return SpecErrors([SpecError(where, message)])


def _convert(err: Mapping[str, Any], data: Mapping[str, Any]) -> SpecError:
    loc: tuple[str | int, ...] = tuple(err["loc"])
    message = _MESSAGES.get(err["type"], err["msg"])
    if err["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
        message += _key_hint(loc[-1], _allowed_keys(loc[:-1]))
    elif err["type"] not in _MESSAGES and "input" in err:
        message += f" (got {_short_repr(err['input'])})"
    return SpecError(_field_path(loc, data), message)


def _raw_graph_errors(data: Mapping[str, Any]) -> list[SpecError]:
    """Dependency problems of a spec whose fields did not validate (pydantic stops before them)."""
    steps = data.get("steps")
    if not isinstance(steps, list):
        return []
    pairs = [
        (s["id"], [d for d in s.get("depends_on") or [] if isinstance(d, str)])
        for s in steps
        if isinstance(s, Mapping) and isinstance(s.get("id"), str) and isinstance(s.get("depends_on") or [], list)
    ]
    return check_graph(pairs)


def _field_path(loc: Sequence[str | int], data: Any) -> str:
    """`('steps', 2, 'models', 0, 'max_tokens')` -> `steps[summarize].models[0].max_tokens`."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            label: str | int = part
            if out == "steps" and isinstance(node, list) and part < len(node):
                step = node[part]
                if isinstance(step, Mapping) and isinstance(step.get("id"), str) and step["id"]:
                    label = step["id"]
            out += f"[{label}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, Mapping) else None
    return out or "(top level)"


def _allowed_keys(loc: Sequence[str | int]) -> list[str]:
    """The field names of the spec model found at `loc`, walking WorkflowSpec's annotations."""
    tp: Any = WorkflowSpec
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(part, int):
            args = typing.get_args(tp)
            tp = args[0] if args else None
        elif isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
            field = tp.model_fields.get(part)
            tp = field.annotation if field is not None else None
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return list(tp.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    """`X | None` -> `X`, so optional sub-models are walked like required ones."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _key_hint(key: str, allowed: list[str]) -> str:
    if not allowed:
        return ""
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f"; allowed keys: {', '.join(allowed)}"


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_INPUT_CHARS else text[: _MAX_INPUT_CHARS - 3] + "..."


def _json_kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
