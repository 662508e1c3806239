"""Hypothesis strategies for what users (and attackers) feed tailrace: specs as data, YAML and JSON text, and
input records. Each starts from something valid and breaks it where it hurts: non-finite and huge numbers,
deep nesting, lone surrogates, wrong types, unknown keys, long lists, aliases that expand."""

from __future__ import annotations

import copy
import datetime
from typing import Any

from hypothesis import strategies as st

FAST = {"provider": "openai", "model": "gpt-4.1-mini", "max_tokens": 50}
BASE: dict[str, Any] = {
    "name": "gen",
    "inputs": ["ticket", "meta"],
    "defaults": {"deadline_s": 5, "max_cost_usd": 0.5},
    "steps": [
        {
            "id": "read",
            "prompt": "Ticket {{input.ticket}}",
            "models": [FAST, {"provider": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 50}],
            "output": {"kind": "json", "json_schema": {"type": "object"}},
        },
        {"id": "reply", "depends_on": ["read"], "prompt": "Reply to {{steps.read}}", "models": [FAST]},
    ],
}

# Where a mutation lands: every field a user writes.
PATHS: list[tuple[str | int, ...]] = [
    ("name",),
    ("inputs",),
    ("inputs", 0),
    ("defaults",),
    ("defaults", "deadline_s"),
    ("defaults", "max_cost_usd"),
    ("defaults", "tenant"),
    ("defaults", "max_attempts_per_step"),
    ("providers",),
    ("steps",),
    ("steps", 0),
    ("steps", 0, "id"),
    ("steps", 0, "prompt"),
    ("steps", 0, "depends_on"),
    ("steps", 0, "models"),
    ("steps", 0, "models", 0),
    ("steps", 0, "models", 0, "max_tokens"),
    ("steps", 0, "models", 0, "temperature"),
    ("steps", 0, "models", 0, "input_usd_per_mtok"),
    ("steps", 0, "models", 0, "expected_ttft_s"),
    ("steps", 0, "models", 0, "provider"),
    ("steps", 0, "output"),
    ("steps", 0, "output", "json_schema"),
    ("steps", 0, "output", "schema_model"),
    ("steps", 0, "output", "copy_ids"),
    ("steps", 0, "hedge"),
    ("steps", 0, "hedge", "stall_gap_s"),
    ("steps", 1, "depends_on"),
    ("steps", 1, "prompt"),
    ("steps", 1, "side_effect"),
]


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def _bomb() -> Any:
    leaf = ["x"] * 8
    for _ in range(6):  # 8**7 values once expanded, 8 objects in memory
        leaf = [leaf] * 8
    return leaf


def _self_referencing() -> Any:
    schema: dict[str, Any] = {"type": "object"}
    schema["properties"] = {"again": schema}
    return schema


NASTY = st.sampled_from(
    [
        float("inf"),
        float("-inf"),
        float("nan"),
        1e30,
        10**30,
        -1,
        0,
        "",
        "\ud800",
        "x\udfffy",
        "{{input.meta.k}}",
        "{{steps.nope}}",
        "{{",
        "this:Model",
        "os:system",
        "x" * 300_000,
        [1] * 5_000,
        ["read"] * 3,
        True,
        None,
        {},
        [],
    ]
) | st.builds(_deep, st.integers(min_value=60, max_value=2_000))


def json_values() -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12)
    )
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    )


def _set(data: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = data
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return  # an earlier mutation removed the way there
    try:
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass


_DELETE = object()


@st.composite
def specs(draw: st.DrawFn, in_python: bool = True) -> dict[str, Any]:
    """A spec as data: the valid base with one to three fields replaced, removed or added."""
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(PATHS))
        value = draw(
            NASTY
            | json_values()
            | st.just(_DELETE)
            | (st.builds(_bomb) | st.builds(_self_referencing) if in_python else st.nothing())
        )
        if draw(st.booleans()) and isinstance(path[-1], str):
            path = (*path[:-1], draw(st.sampled_from(["extra", "max_token", "deadline", path[-1] + "s"])))
        _set(data, path, value)
    return data


def yaml_alias_bomb(levels: int, fanout: int) -> str:
    """A YAML spec whose json_schema expands to fanout**levels values through aliases."""
    lines = [f"a0: &a0 [{', '.join(['x'] * fanout)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]")
    return "\n".join(
        [
            "name: bomb",
            *lines,
            "steps:",
            "  - id: s",
            "    prompt: p",
            "    models: [{provider: openai, model: m, max_tokens: 5}]",
            f"    output: {{kind: json, json_schema: {{type: object, enum: *a{levels - 1}}}}}",
        ]
    )


# ---- input records --------------------------------------------------------------------------------

GOOD_RECORD = {"ticket": "T-1", "meta": {"k": "v"}}


@st.composite
def records(draw: st.DrawFn) -> Any:
    """One input record from Python: mostly broken, sometimes fine."""
    record: Any = dict(GOOD_RECORD)
    kind = draw(st.sampled_from(["good", "field", "id", "key", "drop", "not_a_mapping"]))
    if kind == "field":
        record[draw(st.sampled_from(["ticket", "meta"]))] = draw(
            NASTY | json_values() | st.just(datetime.date(2026, 1, 1)) | st.just({1, 2}) | st.just(b"bytes")
        )
    elif kind == "id":
        record["id"] = draw(NASTY | json_values() | st.text(max_size=8))
    elif kind == "key":
        record[draw(st.integers() | st.just("\ud800") | st.just(None))] = 1
    elif kind == "drop":
        del record[draw(st.sampled_from(["ticket", "meta"]))]
    elif kind == "not_a_mapping":
        record = draw(json_values().filter(lambda v: not isinstance(v, dict)))
    return record
