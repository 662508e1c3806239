"""Batches of input records: JSONL files read line by line, and every record checked before it becomes a run.

A batch is numbered from 1 (the line of a JSONL file, the position in an iterable). A record that cannot
be a run (a line that is not a JSON object, a missing declared field, a value that is not JSON or holds
text no request can carry, an unusable or repeated run id) becomes a `RejectedRecord`: it ends as a run
of its own, failed `invalid_input` with its line in the detail, and the rest of the batch goes on.
`load_inputs` is the strict reader for callers that want the first problem as an `InputError`.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tailrace.engine._bounds import NOT_ENCODABLE, ShapeLimits, encodable
from tailrace.engine.errors import InputError

if TYPE_CHECKING:
    from tailrace.engine.specs import WorkflowSpec

_MAX_QUOTED_CHARS = 60


def load_inputs(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for each non-blank line of a JSONL file, reading lazily; raise
    `InputError` naming the file and line at the first line that is not a JSON object."""
    for number, record in read_input_lines(path):
        if isinstance(record, str):
            raise InputError(f"{path}:{number}: {record}")
        yield number, record


def read_input_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield (line number, record) for each non-blank line of a JSONL file, or (line number, problem)
    for a line that is not a JSON object in UTF-8: one bad line never hides the others. A file that
    cannot be opened raises `InputError`."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    yield number, f"not UTF-8 text: {exc.reason} at byte {exc.start}"
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except RecursionError:
                    yield number, f"nested deeper than {RECORD_SHAPE.max_depth} levels"
                    continue
                except ValueError as exc:
                    yield number, f"not valid JSON: {exc}"
                    continue
                if not isinstance(record, dict):
                    yield number, f"expected a JSON object, got {_json_kind(record)}"
                    continue
                yield number, record
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None


def check_inputs(spec: WorkflowSpec, record: Mapping[str, Any], line: int, source: str = "") -> None:
    """Raise `InputError` when `record` (from `line` of `source`) lacks a field the spec declares."""
    missing = [name for name in spec.inputs if name not in record]
    if missing:
        where = f"{source}:{line}" if source else f"line {line}"
        raise InputError(f"{where}: missing input field(s): {', '.join(missing)}")


@dataclass(frozen=True)
class RejectedRecord:
    """A record that cannot become a run. It still ends as a run of its own, failed `invalid_input`
    with `problem` (which names its line) as the detail, so one bad record never stops the batch."""

    line: int
    problem: str


Numbered = Iterator[tuple[str, "dict[str, Any] | RejectedRecord"]]


def numbered_records(
    spec: WorkflowSpec, records: Iterable[Any] | str | Path, skip: Container[str] = frozenset()
) -> Numbered:
    """(run id, record) for every record of a batch (a JSONL path or an iterable of mappings), numbered
    from 1, skipping run ids in `skip` (a resumed batch). A record that cannot be run comes as a
    `RejectedRecord`; its run id is its own when usable, else `run-<line>`, and a second record with
    an id already seen in this batch gets `<id>@line<N>`, so each run id appears once."""
    numbered: Iterable[tuple[int, Any]]
    if isinstance(records, str | Path):
        source = str(records)
        numbered = read_input_lines(records)
    else:
        source = ""
        numbered = enumerate(records, start=1)
    seen: set[str] = set()
    for line, record in numbered:
        where = f"{source}:{line}" if source else f"line {line}"
        run_id, id_problem = _run_id(record, line)
        if run_id in skip:
            continue
        if run_id in seen:
            first_id, run_id = run_id, f"{run_id}@line{line}"
            yield run_id, RejectedRecord(line, f"{where}: run id {first_id!r} is used by an earlier record too")
            continue
        seen.add(run_id)
        unreadable = record if source and isinstance(record, str) else None  # the reader's problem with the line
        problem = unreadable or id_problem or record_problem(spec, record)
        if problem is not None:
            yield run_id, RejectedRecord(line, f"{where}: {problem}")
        else:
            yield run_id, dict(record)


def record_problem(spec: WorkflowSpec, record: Any) -> str | None:
    """Why `record` cannot be a run's input, or None: not a mapping, a declared field missing, a key
    that is not a string, a value that is not JSON (or nests too deep, or holds text that cannot be
    encoded, such as a lone surrogate: no request could carry it)."""
    if not isinstance(record, Mapping):
        return f"expected a mapping of input fields, got {_json_kind(record)}"
    bad_keys = [k for k in record if not isinstance(k, str)]
    if bad_keys:
        return f"input field names must be strings, got {_short_repr(bad_keys[0])}"
    missing = [name for name in spec.inputs if name not in record]
    if missing:
        return f"missing input field(s): {', '.join(missing)}"
    for key, value in record.items():
        if (problem := _value_problem(value)) is not None:
            return f"input field {_short_repr(key)}: {problem}"
        if not encodable(key):
            return f"input field name {_short_repr(key)} {_NOT_ENCODABLE}"
    return None


_NOT_ENCODABLE = f"holds text that {NOT_ENCODABLE}"
RECORD_SHAPE = ShapeLimits(max_depth=64, max_nodes=1_000_000, max_chars=64 * 1024 * 1024)
_MAX_RUN_ID_CHARS = 256


def _run_id(record: Any, line: int) -> tuple[str, str | None]:
    """The record's run id (`run_id`, else `id`, else `run-<line>`) and, when its own id is unusable,
    why (the run then goes by `run-<line>`)."""
    default = f"run-{line:06d}"
    if not isinstance(record, Mapping):
        return default, None
    value = record.get("run_id") or record.get("id")
    if value is None or value == "" or value is False:
        return default, None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return default, f"a run id must be a string or an integer, got {_json_kind(value)}"
    text = str(value)
    if not encodable(text):
        return default, f"the run id {_NOT_ENCODABLE}"
    if len(text) > _MAX_RUN_ID_CHARS:
        return default, f"the run id is {len(text):,} characters; at most {_MAX_RUN_ID_CHARS}"
    return text, None


def _value_problem(value: Any) -> str | None:
    """Why `value` is not a usable JSON input value, or None; iterative, bounded by `RECORD_SHAPE`."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = chars = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if isinstance(item, str):
            chars += len(item)
            if not encodable(item):
                return _NOT_ENCODABLE
        elif isinstance(item, bool | int | None):
            pass
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                return f"holds {item!r}, which is not a JSON number"
        elif isinstance(item, Mapping | list | tuple):
            if depth >= RECORD_SHAPE.max_depth:
                return f"nested deeper than {RECORD_SHAPE.max_depth} levels"
            if isinstance(item, Mapping):
                for k, v in item.items():
                    if not isinstance(k, str):
                        return f"holds an object key that is not a string ({_short_repr(k)})"
                    if not encodable(k):
                        return _NOT_ENCODABLE
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in item)
        else:
            return f"holds a value of type {type(item).__name__!r}, which is not JSON"
        if nodes > RECORD_SHAPE.max_nodes or chars > RECORD_SHAPE.max_chars:
            return f"larger than {RECORD_SHAPE.max_nodes:,} values or {RECORD_SHAPE.max_chars:,} characters"
    return None


def _short_repr(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= _MAX_QUOTED_CHARS else text[: _MAX_QUOTED_CHARS - 3] + "..."


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother = _MAX_QUOTED_CHARS, 40
    return r


_REPR = _bounded_repr()


def _json_kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else names.get(type(value), f"a {type(value).__name__}")
