"""Size and depth bounds on plain data (what YAML, JSON or a caller's dicts hold), checked without recursion.

Text is checked too: a string that cannot be encoded as UTF-8 (a lone surrogate) can be neither sent
nor written, so it is refused where it enters.

A spec is input. A 700-byte YAML file can expand through aliases to billions of nodes, a self-referencing
dict never ends, and a 1,000-level nesting overflows every recursive walk (pydantic, `json.dumps`,
`repr`). `check_shape` walks the data iteratively and stops at the first bound it crosses, so its cost
is bounded by the limits, not by the data; shared sub-values are counted each time they are reached,
as every later consumer would expand them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShapeLimits:
    max_depth: int = 64
    max_nodes: int = 200_000
    max_chars: int = 8 * 1024 * 1024  # strings and keys, as expanded


class ShapeError(ValueError):
    """The data crosses a bound; `path` is where (keys and list indexes from the top)."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(message)


NOT_ENCODABLE = "cannot be encoded as UTF-8 (a lone surrogate)"


def encodable(text: str) -> bool:
    """False for text no request or file can carry (a lone surrogate, e.g. from a JSON `"\\ud800"`)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_END = object()


def _children(item: Any) -> Any:
    return iter(item.items()) if isinstance(item, Mapping) else enumerate(item)


def check_shape(value: Any, limits: ShapeLimits = ShapeLimits()) -> None:
    """Raise `ShapeError` when `value` nests deeper than, or expands to more values or characters than,
    `limits`, or holds text that cannot be encoded.

    Shared sub-values (YAML aliases, one dict used twice) are measured once and counted each time they
    are used, so the walk visits each distinct value once: its cost is bounded by `max_nodes`, not by
    what the value expands to. A count that crosses its bound is reported under the top-level key it
    was crossed in.
    """
    if not isinstance(value, Mapping | list | tuple):
        if isinstance(value, str) and not encodable(value):
            raise ShapeError((), f"holds text that {NOT_ENCODABLE}")
        return
    measured: dict[int, tuple[int, int, int]] = {}  # id -> (values, characters, height) once expanded
    texts_ok: set[int] = set()
    distinct = 0
    # Per open container: [container, its (key, child) iterator, key it was reached by, values, chars, height]
    stack: list[list[Any]] = [[value, _children(value), None, 1, 0, 0]]
    open_ids = {id(value)}

    def where() -> tuple[str | int, ...]:
        return tuple(frame[2] for frame in stack[1:])

    def too_big(frame: list[Any]) -> None:
        if frame[3] > limits.max_nodes:
            raise ShapeError(where()[:1], f"more than {limits.max_nodes:,} values, counting each use of an alias")
        if frame[4] > limits.max_chars:
            message = f"more than {limits.max_chars:,} characters of text, counting each use of an alias"
            raise ShapeError(where()[:1], message)

    while stack:
        frame = stack[-1]
        key, child = next(frame[1], (_END, _END))
        if key is _END:
            stack.pop()
            open_ids.discard(id(frame[0]))
            measured[id(frame[0])] = (frame[3], frame[4], frame[5])
            if stack:
                parent = stack[-1]
                parent[3] += frame[3]
                parent[4] += frame[4]
                parent[5] = max(parent[5], frame[5] + 1)
                too_big(parent)
            continue
        if key.__class__ is str:
            frame[4] += len(key)
            if not key.isascii() and not encodable(key):
                raise ShapeError(where(), f"has a key that {NOT_ENCODABLE}")
        if isinstance(child, str):
            frame[3] += 1
            frame[4] += len(child)
            if not child.isascii() and id(child) not in texts_ok:
                if not encodable(child):
                    raise ShapeError((*where(), _label(key)), f"holds text that {NOT_ENCODABLE}")
                texts_ok.add(id(child))
            continue
        if not isinstance(child, Mapping | list | tuple):
            frame[3] += 1
            continue
        cid = id(child)
        known = measured.get(cid)
        if known is not None:
            frame[3] += known[0]
            frame[4] += known[1]
            frame[5] = max(frame[5], known[2] + 1)
            if len(stack) + known[2] >= limits.max_depth:
                raise ShapeError((*where(), _label(key)), f"nested deeper than {limits.max_depth} levels")
            too_big(frame)
            continue
        if cid in open_ids or len(stack) >= limits.max_depth:  # a value that contains itself never ends
            raise ShapeError((*where(), _label(key)), f"nested deeper than {limits.max_depth} levels")
        distinct += len(child) + 1  # bounds the walk: every value is visited once
        if distinct > limits.max_nodes:
            stack.append([child, iter(()), _label(key), 0, 0, 0])
            raise ShapeError(where()[:1], f"more than {limits.max_nodes:,} values, counting each use of an alias")
        stack.append([child, _children(child), _label(key), 1, 0, 0])
        open_ids.add(cid)


def _label(key: Any) -> str | int:
    return key if isinstance(key, str | int) else repr(key)
