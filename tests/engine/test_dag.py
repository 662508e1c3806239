"""The step DAG: order, readiness, cycles, and the critical path on a diamond and on a 6-step shape."""

from __future__ import annotations

import pytest

from tailrace.engine.dag import Dag, ancestors_of, find_cycle
from tailrace.engine.errors import SpecError
from tailrace.engine.specs import WorkflowSpec

# One step, three in parallel, then two (the support-triage shape).
SIX = Dag(
    ["classify", "sentiment", "policy", "facts", "reply", "note"],
    {
        "sentiment": ["classify"],
        "policy": ["classify"],
        "facts": ["classify"],
        "reply": ["sentiment", "policy", "facts"],
        "note": ["sentiment", "facts"],
    },
)
SIX_W = {"classify": 2.0, "sentiment": 1.0, "policy": 4.0, "facts": 3.0, "reply": 2.0, "note": 5.0}

DIAMOND = Dag(["a", "b", "c", "d"], {"b": ["a"], "c": ["a"], "d": ["b", "c"]})


def test_topological_order_breaks_ties_by_declaration():
    # "z" is declared first but depends on "y"; "x" and "y" are both roots.
    dag = Dag(["z", "x", "y", "w"], {"z": ["y"], "w": ["x"]})
    assert dag.topological_order() == ["x", "y", "z", "w"]
    assert SIX.topological_order() == ["classify", "sentiment", "policy", "facts", "reply", "note"]


def test_parents_children_roots_sinks():
    assert SIX.parents("reply") == ["sentiment", "policy", "facts"]
    assert SIX.children("classify") == ["sentiment", "policy", "facts"]
    assert SIX.children("facts") == ["reply", "note"]
    assert SIX.roots() == ["classify"]
    assert SIX.sinks() == ["reply", "note"]
    assert SIX.ancestors("note") == ["classify", "sentiment", "facts"]
    assert len(SIX) == 6 and "policy" in SIX and "nope" not in SIX


def test_ready_follows_completion():
    assert SIX.ready(done=set(), started=set()) == ["classify"]
    assert SIX.ready(done=set(), started={"classify"}) == []
    assert SIX.ready(done={"classify"}, started={"classify"}) == ["sentiment", "policy", "facts"]
    assert SIX.ready(done={"classify", "sentiment", "facts"}, started={"policy"}) == ["note"]
    assert SIX.ready(done=set(SIX.nodes), started=set(SIX.nodes)) == []


def test_unknown_node_is_a_key_error():
    with pytest.raises(KeyError):
        SIX.parents("nope")
    with pytest.raises(KeyError):
        SIX.remaining_critical_path("nope", SIX_W)


CYCLES = [
    ("none", {"a": ["b"], "b": []}, None),
    ("self loop", {"a": ["a"]}, ["a", "a"]),
    ("two", {"a": ["b"], "b": ["a"]}, ["a", "b", "a"]),
    ("three, named from the first declared", {"b": ["c"], "a": ["b"], "c": ["a"]}, ["b", "c", "a", "b"]),
    ("three after a tail", {"t": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}, ["a", "b", "c", "a"]),
    ("unknown targets ignored", {"a": ["ghost"], "b": ["a"]}, None),
    ("diamond is not a cycle", {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}, None),
]


@pytest.mark.parametrize(("name", "edges", "expected"), CYCLES, ids=[c[0] for c in CYCLES])
def test_find_cycle(name, edges, expected):
    assert find_cycle(edges) == expected


def test_find_cycle_handles_a_long_chain_without_recursion():
    n = 5000
    edges = {f"s{i}": [f"s{i + 1}"] for i in range(n)} | {f"s{n}": ["s0"]}
    cycle = find_cycle(edges)
    assert cycle is not None and len(cycle) == n + 2 and cycle[0] == cycle[-1] == "s0"


def test_ancestors_of_is_safe_on_cycles():
    assert ancestors_of({"a": ["b"], "b": ["a"]}, "a") == {"a", "b"}


def test_constructor_rejects_cycles_and_unknown_parents():
    with pytest.raises(SpecError, match=r"cycle: a -> b -> c -> a"):
        Dag(["a", "b", "c"], {"b": ["a"], "c": ["b"], "a": ["c"]})
    with pytest.raises(SpecError, match="unknown steps: ghost"):
        Dag(["a"], {"a": ["ghost"]})
    with pytest.raises(SpecError, match="duplicate"):
        Dag(["a", "a"], {})


def test_critical_path_on_a_diamond():
    assert DIAMOND.critical_path({"a": 1, "b": 2, "c": 5, "d": 1}) == (["a", "c", "d"], 7.0)
    assert DIAMOND.critical_path({"a": 1, "b": 5, "c": 2, "d": 1}) == (["a", "b", "d"], 7.0)
    # A tie goes to the branch declared first.
    assert DIAMOND.critical_path({"a": 1, "b": 3, "c": 3, "d": 1}) == (["a", "b", "d"], 5.0)


def test_critical_path_on_six_steps():
    # classify 2 + max(policy 4 -> reply 2 = 6, facts 3 -> note 5 = 8, sentiment 1 -> note 5 = 6).
    assert SIX.critical_path(SIX_W) == (["classify", "facts", "note"], 10.0)
    uniform = dict.fromkeys(SIX.nodes, 1.0)
    assert SIX.critical_path(uniform) == (["classify", "sentiment", "reply"], 3.0)


def test_remaining_critical_path_is_inclusive_and_looks_downstream():
    assert SIX.remaining_critical_paths(SIX_W) == {
        "classify": 10.0,
        "sentiment": 6.0,
        "policy": 6.0,
        "facts": 8.0,
        "reply": 2.0,
        "note": 5.0,
    }
    assert SIX.remaining_critical_path("classify", SIX_W) == SIX.critical_path(SIX_W)[1]
    assert DIAMOND.remaining_critical_path("b", {"a": 1, "b": 2, "c": 5, "d": 1}) == 3.0


def test_time_allocation_share():
    # The allocator's rule: a step gets remaining * w / remaining_critical_path(step).
    remaining = 20.0
    share = remaining * SIX_W["classify"] / SIX.remaining_critical_path("classify", SIX_W)
    assert share == pytest.approx(4.0)


def test_weights_must_cover_every_step_and_not_be_negative():
    with pytest.raises(KeyError, match="note"):
        SIX.critical_path({k: v for k, v in SIX_W.items() if k != "note"})
    with pytest.raises(ValueError, match="negative"):
        DIAMOND.critical_path({"a": 1, "b": -1, "c": 1, "d": 1})


def test_empty_dag():
    dag = Dag([], {})
    assert dag.topological_order() == [] and dag.critical_path({}) == ([], 0.0)


def test_from_spec():
    m = {"provider": "openai", "model": "gpt-4o-mini", "max_tokens": 10}
    spec = WorkflowSpec.model_validate(
        {
            "name": "w",
            "steps": [
                {"id": "late", "prompt": "x", "depends_on": ["early"], "models": [m]},
                {"id": "early", "prompt": "x", "models": [m]},
            ],
        }
    )
    dag = Dag.from_spec(spec)
    assert dag.nodes == ("late", "early")
    assert dag.topological_order() == ["early", "late"]
