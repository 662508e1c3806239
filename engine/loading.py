"""Read workflow specs (YAML or JSON, one meaning) and JSONL input batches, with errors users can act on.

Everything wrong with a spec comes out as `SpecErrors`, each error under a field path that names
steps by id (`steps[summarize].models[0].max_tokens`) rather than pydantic's positional
`steps.2.models.0.max_tokens`. File-level problems (missing file, syntax error, a top level that
is not a mapping) are reported the same way, under the file name (and `:line` for syntax errors).
Batches of inputs are read by `tailrace.engine.records` (`load_inputs` and `check_inputs` are
re-exported here).

A spec is input, so loading it is bounded: the file's size, its nesting depth and what its YAML
aliases expand to are checked before anything is built (`tailrace.engine._bounds`), so an alias bomb,
a 1,000-level nesting or a self-referencing value is one error naming where, in milliseconds. Loading
never imports or runs anything the spec names.
"""

from __future__ import annotations

import difflib
import json
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from tailrace.engine._bounds import ShapeError, ShapeLimits, check_shape, encodable
from tailrace.engine.errors import SpecError, SpecErrors
from tailrace.engine.records import check_inputs, load_inputs  # noqa: F401  (the inputs half of loading)
from tailrace.engine.spec_checks import check_graph
from tailrace.engine.specs import SpecLimits, WorkflowSpec

_SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}
# Pydantic error types whose message reads better in spec terms.
_MESSAGES = {"extra_forbidden": "unknown key", "missing": "missing required key"}
_MAX_INPUT_CHARS = 60
MAX_SPEC_BYTES = 1024 * 1024
_SHOWN_PATH = 8  # keys of a too-deep path an error shows
# libyaml's safe loader when PyYAML has it: the pure-Python scanner is quadratic on a line of nested
# flow collections ("[[[[..."), libyaml is not and stops at its own depth limit.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# PyYAML builds ~50,000 values a second (in Python, even on libyaml): 20,000 bound the worst spec's load
# well under a second, and a 1,000-step chain (the step limit) is about 10,000.
SPEC_SHAPE = ShapeLimits(max_depth=64, max_nodes=20_000, max_chars=8 * 1024 * 1024)


def _bounded_repr() -> reprlib.Repr:
    """repr for a value an error quotes: bounded however large or deep the value is."""
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 4, 4, 4, 4
    r.maxstring, r.maxother = _MAX_INPUT_CHARS, 40
    return r


_REPR = _bounded_repr()


def load_workflow(path: str | Path) -> WorkflowSpec:
    """Load a workflow spec from a `.yaml`, `.yml` or `.json` file."""
    path = Path(path)
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise _file_error(str(path), f"unsupported file type {path.suffix!r}; use .yaml, .yml or .json")
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise _file_error(str(path), f"the file is larger than {MAX_SPEC_BYTES:,} bytes")
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
        steps = data.get("steps")
        if isinstance(steps, list) and len(steps) > SpecLimits.MAX_STEPS:  # before walking them all
            raise ShapeError(("steps",), f"{len(steps):,} steps; at most {SpecLimits.MAX_STEPS:,}")
        check_shape(data, SPEC_SHAPE)
    except ShapeError as exc:
        where = _field_path(exc.path[:_SHOWN_PATH], data) + ("..." if len(exc.path) > _SHOWN_PATH else "")
        errors = SpecErrors([SpecError(where, exc.message)])
        errors.add_note(f"in {source}")
        raise errors from None
    try:
        return WorkflowSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = SpecErrors([_convert(err, data) for err in exc.errors(include_url=False)] + _raw_graph_errors(data))
        errors.add_note(f"in {source}")
        raise errors from None
    except SpecErrors as exc:
        exc.add_note(f"in {source}")
        raise


def _parse_yaml(text: str, source: str) -> Any:
    try:
        _check_yaml_events(text, source)
        return yaml.load(text, Loader=_YAML_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = exc.problem or exc.context or "syntax error"
        raise _file_error(where, f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:
        raise _file_error(source, f"YAML error: {exc}") from None


def _check_yaml_events(text: str, source: str) -> None:
    """Bound depth and alias expansion from the parser's events, before any value is built.

    PyYAML's composer and constructor recurse once per level and expand every alias, so the bounds
    must hold before `safe_load`: each anchored node's expanded size is known when it closes, an
    alias adds that size to every collection around it, and an alias to a node still open (a
    recursive structure) is refused outright.
    """
    limits = SPEC_SHAPE
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (values, characters) it expands to
    open_nodes: list[list[Any]] = []  # per open collection: [values, characters, anchor]
    total_nodes = total_chars = 0

    def add(nodes: int, chars: int, event: yaml.Event) -> None:
        nonlocal total_nodes, total_chars
        for frame in open_nodes:
            frame[0] += nodes
            frame[1] += chars
        total_nodes += nodes
        total_chars += chars
        if total_nodes > limits.max_nodes or total_chars > limits.max_chars:
            what = (
                f"{limits.max_nodes:,} values" if total_nodes > limits.max_nodes else f"{limits.max_chars:,} characters"
            )
            raise _file_error(_where(source, event), f"the spec expands to more than {what} (YAML aliases)")

    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.ScalarEvent):
            add(1, len(event.value), event)
            if event.anchor is not None:
                sizes[event.anchor] = (1, len(event.value))
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(open_nodes) >= limits.max_depth:
                raise _file_error(_where(source, event), f"nested deeper than {limits.max_depth} levels")
            add(1, 0, event)
            open_nodes.append([0, 0, event.anchor])
        elif isinstance(event, yaml.CollectionEndEvent):
            nodes, chars, anchor = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = (nodes + 1, chars)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                if any(frame[2] == event.anchor for frame in open_nodes):
                    message = f"alias *{event.anchor} refers to itself (a recursive value)"
                    raise _file_error(_where(source, event), message)
                continue  # an undefined alias: safe_load reports it with its line
            add(*sizes[event.anchor], event)


def _where(source: str, event: yaml.Event) -> str:
    mark = event.start_mark
    return f"{source}:{mark.line + 1}" if mark is not None else source


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _file_error(f"{source}:{exc.lineno}", f"JSON syntax error: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        limit = SPEC_SHAPE.max_depth
        raise _file_error(source, f"nested deeper than {limit} levels") from None


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
                step_id = step.get("id") if isinstance(step, Mapping) else None
                if isinstance(step_id, str) and step_id and len(step_id) <= 64 and encodable(step_id):
                    label = step_id
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
    text = _REPR.repr(value)  # bounded: never expands a large or deep value in full
    return text if len(text) <= _MAX_INPUT_CHARS else text[: _MAX_INPUT_CHARS - 3] + "..."
