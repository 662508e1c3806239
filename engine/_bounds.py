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


# A path is a linked list (parent, key) so pushing a child costs O(1), not O(depth).
_Path = tuple[Any, str | int] | None


def _unlink(node: _Path) -> tuple[str | int, ...]:
    keys: list[str | int] = []
    while node is not None:
        node, key = node
        keys.append(key)
    return tuple(reversed(keys))


def check_shape(value: Any, limits: ShapeLimits = ShapeLimits()) -> None:
    """Raise `ShapeError` when `value` nests deeper than, or expands to more values or characters than, `limits`.

    A count that crosses its bound is reported under the top-level key that holds the most of it.
    """
    stack: list[tuple[Any, int, _Path, Any]] = [(value, 0, None, None)]
    nodes = chars = 0
    by_top: dict[Any, int] = {}  # values under each top-level key, to say where the bulk is
    while stack:
        item, depth, path, top = stack.pop()
        nodes += 1
        by_top[top] = by_top.get(top, 0) + 1
        if isinstance(item, str):
            chars += len(item)
            by_top[top] += len(item) // 64  # long text weighs on where the bulk is
            if not encodable(item):
                raise ShapeError(_unlink(path), f"holds text that {NOT_ENCODABLE}")
        elif isinstance(item, Mapping | list | tuple):
            if depth >= limits.max_depth:
                raise ShapeError(_unlink(path), f"nested deeper than {limits.max_depth} levels")
            nodes_after = nodes + len(item)
            by_top[top] += len(item)
            if nodes_after > limits.max_nodes:
                break
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if isinstance(key, str):
                        chars += len(key)
                        if not encodable(key):
                            raise ShapeError(_unlink(path), f"has a key that {NOT_ENCODABLE}")
                    label = key if isinstance(key, str | int) else repr(key)
                    stack.append((child, depth + 1, (path, label), label if depth == 0 else top))
            else:
                stack.extend((child, depth + 1, (path, i), i if depth == 0 else top) for i, child in enumerate(item))
        if nodes > limits.max_nodes or chars > limits.max_chars:
            break
    else:
        return
    bulk = max(by_top, key=by_top.__getitem__)
    where = () if bulk is None else (bulk,)
    if chars > limits.max_chars:
        raise ShapeError(where, f"more than {limits.max_chars:,} characters of text, counting each use of an alias")
    raise ShapeError(where, f"more than {limits.max_nodes:,} values, counting each use of an alias")
