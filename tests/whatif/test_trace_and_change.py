"""Reading traces and describing changes: bad input names the line, the field or the flag."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tailrace.engine.errors import InputError, SpecError
from tailrace.engine.specs import WorkflowSpec
from tailrace.whatif.change import WhatIf, plan_for
from tailrace.whatif.trace_data import read_trace, trace_path_for

WORKFLOW = {
    "name": "w",
    "inputs": ["ticket_id"],
    "steps": [
        {
            "id": "answer",
            "prompt": "Answer {{input.ticket_id}}",
            "models": [
                {"provider": "openai", "model": "gpt-4.1", "max_tokens": 100},
                {"provider": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 100},
            ],
        }
    ],
}
RUN = {
    "kind": "run",
    "run_id": "r1",
    "delivered": True,
    "started_at": 100.0,
    "ended_at": 101.0,
    "deadline_at": 110.0,
    "latency_s": 1.0,
    "inputs": {"ticket_id": "T-1"},
}
ATTEMPT = {
    "kind": "attempt",
    "run_id": "r1",
    "step_id": "answer",
    "attempt": 0,
    "provider": "openai",
    "model": "gpt-4.1",
    "started_at": 100.1,
    "ended_at": 100.9,
    "ttft_s": 0.3,
    "latency_s": 0.8,
    "outcome": "valid",
    "won": True,
}


def write(tmp_path, *lines, name="results.trace.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def test_a_trace_without_settings_replays_with_the_defaults_and_says_so(tmp_path):
    path = write(tmp_path, {"kind": "batch", "workflow": WORKFLOW}, RUN, ATTEMPT, '{"kind": "attempt", "run_')
    data = read_trace(tmp_path / "results.jsonl")  # the results file finds its trace
    assert data.path == path
    assert data.notes == [
        "the trace does not record the settings its batch ran with: assuming the defaults",
        "1 line(s) cut by a crash were skipped",
    ]
    assert data.options().deadline_s == 10.0  # from what the runs carried
    assert data.concurrency() == 1


def test_settings_this_version_does_not_know_are_dropped_not_fatal(tmp_path):
    settings = {
        "hedge": {"ttft_quantile": 0.8, "retired_knob": 3},
        "tuning": {"latency": {"gone": 1}},
        "max_in_flight": 4,
    }
    path = write(tmp_path, {"kind": "batch", "workflow": WORKFLOW, "settings": settings}, RUN, ATTEMPT)
    data = read_trace(path)
    assert data.settings.hedge.ttft_quantile == 0.8 and data.settings.max_in_flight == 4


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([RUN, ATTEMPT], "not a tailrace trace (no batch line"),
        ([{"kind": "batch", "workflow": WORKFLOW}], "has no finished runs"),
        ([{"kind": "batch", "workflow": WORKFLOW}, {**RUN, "latency_s": "slow"}], ":2: run line, field latency_s"),
        (
            [{"kind": "batch", "workflow": WORKFLOW}, RUN, {**ATTEMPT, "model": "gpt-9"}],
            "used openai/gpt-9, which is not",
        ),
        (
            [{"kind": "batch", "workflow": {**WORKFLOW, "providers": {"x": {"kind": "opnai"}}}}, RUN],
            "the workflow in the batch line is invalid",
        ),
        (
            [{"kind": "batch", "workflow": WORKFLOW}, RUN, {**ATTEMPT, "outcome": "cancelled"}],
            "no attempt in the trace was answered",
        ),
    ],
)
def test_bad_traces_name_what_is_wrong(tmp_path, lines, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        read_trace(write(tmp_path, *lines))


def test_trace_paths():
    assert trace_path_for("out/results.jsonl").name == "results.trace.jsonl"
    assert trace_path_for("out/results.trace.jsonl").name == "results.trace.jsonl"


def test_changes_are_checked_and_described(tmp_path):
    with pytest.raises(ValidationError, match="ttft_quantil: unknown setting"):
        WhatIf(hedge={"ttft_quantil": 0.8})
    with pytest.raises(ValidationError, match="ttft_quantile"):
        WhatIf(hedge={"ttft_quantile": 2})
    change = WhatIf(deadline_s=5, hedge={"enabled": False}, ladder={"*": ["claude-haiku-4-5", "gpt-4.1"]}, tpm=1000)
    assert change.describe() == "deadline 5 s; hedge enabled=False; ladder[*] claude-haiku-4-5 > gpt-4.1; tpm 1,000"
    assert WhatIf().describe() == "as recorded" and WhatIf().is_empty
    data = read_trace(write(tmp_path, {"kind": "batch", "workflow": WORKFLOW}, RUN, ATTEMPT))
    plan = plan_for(data, change)
    assert [m.model for m in plan.workflow.step("answer").models] == ["claude-haiku-4-5", "gpt-4.1"]
    assert isinstance(plan.workflow, WorkflowSpec)
    with pytest.raises(SpecError, match=r"ladder\[nope\]: no such step"):
        plan_for(data, WhatIf(ladder={"nope": ["gpt-4.1"]}))
    with pytest.raises(SpecError, match=r"ladder\[answer\]: gpt-5 is not on this step's ladder"):
        plan_for(data, WhatIf(ladder={"answer": ["gpt-5"]}))


def test_a_trace_written_in_parts_is_read_back_to_back_and_replayed_in_its_parts(tmp_path):
    later = 3600.0  # the batch was resumed an hour later
    second_run = {
        **RUN,
        "run_id": "r2",
        "started_at": 100.0 + later,
        "ended_at": 102.0 + later,
        "deadline_at": 110 + later,
    }
    second_attempt = {**ATTEMPT, "run_id": "r2", "started_at": 100.1 + later, "ended_at": 101.9 + later}
    batch = {"kind": "batch", "workflow": WORKFLOW, "settings": {"max_in_flight": 4}}
    data = read_trace(write(tmp_path, batch, RUN, ATTEMPT, batch, second_run, second_attempt))
    assert data.batches == 2
    assert data.span_s == pytest.approx(1.0 + 2.0)  # busy time only
    assert data.elapsed(100.1 + later, "r2") == pytest.approx(1.1)
    (first, pause0), (second, pause1) = data.segments()
    assert [r.run_id for r in first] == ["r1"] and [r.run_id for r in second] == ["r2"]
    assert (pause0, pause1) == (0.0, pytest.approx(later - 1.0))
    from tailrace.whatif.prediction import parts_for

    parts = parts_for(data, None)
    assert [p.pause_s for p in parts] == [0.0, pytest.approx(later - 1.0)]
    assert len(parts_for(data, 10)) == 1 and len(parts_for(data, 10)[0].records) == 10
