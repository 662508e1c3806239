"""Input records: every record of a batch becomes a run or a `RejectedRecord` naming its line; ids are unique."""

from __future__ import annotations

import json

from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.records import RejectedRecord, numbered_records, read_input_lines

SPEC = workflow_from_dict(
    {
        "name": "w",
        "inputs": ["ticket"],
        "steps": [
            {"id": "a", "prompt": "{{input.ticket}}", "models": [{"provider": "openai", "model": "m", "max_tokens": 5}]}
        ],
    }
)


def test_each_record_is_a_run_or_a_rejection_with_its_line_and_ids_are_unique():
    batch = [
        {"id": "a", "ticket": "T"},
        {"id": "a", "ticket": "T"},  # the same id again
        {"ticket": "T"},  # no id: run-<line>
        {"run_id": 7, "ticket": "T"},
        {"id": "x\ud800", "ticket": "T"},
        {"id": ["list"], "ticket": "T"},
        {"id": "b"},  # missing field
        {"id": "c", "ticket": float("inf")},
        {"id": "d", "ticket": {1: "int key"}},
        {"id": "e", "ticket": object()},
        "not a mapping",
        {"id": "f", "ticket": "T", 3: "non-string field name"},
        {"id": "g" * 300, "ticket": "T"},
    ]
    got = list(numbered_records(SPEC, batch))
    ids = [run_id for run_id, _ in got]
    assert len(ids) == len(set(ids)) == len(batch)
    runs = {run_id: record for run_id, record in got}
    assert runs["a"] == {"id": "a", "ticket": "T"} and runs["run-000003"] == {"ticket": "T"}
    assert runs["7"] == {"run_id": 7, "ticket": "T"}
    rejected = {run_id: r.problem for run_id, r in got if isinstance(r, RejectedRecord)}
    assert rejected == {
        "a@line2": "line 2: run id 'a' is used by an earlier record too",
        "run-000005": "line 5: the run id holds text that cannot be encoded as UTF-8 (a lone surrogate)",
        "run-000006": "line 6: a run id must be a string or an integer, got an array",
        "b": "line 7: missing input field(s): ticket",
        "c": "line 8: input field 'ticket': holds inf, which is not a JSON number",
        "d": "line 9: input field 'ticket': holds an object key that is not a string (1)",
        "e": "line 10: input field 'ticket': holds a value of type 'object', which is not JSON",
        "run-000011": "line 11: expected a mapping of input fields, got a string",
        "f": "line 12: input field names must be strings, got 3",
        "run-000013": "line 13: the run id is 300 characters; at most 256",
    }


def test_resumed_batches_skip_finished_runs_before_anything_else():
    batch = [{"id": "a", "ticket": "T"}, {"id": "a", "ticket": "T"}, {"id": "b", "ticket": "T"}]
    assert [run_id for run_id, _ in numbered_records(SPEC, batch, skip={"a"})] == ["b"]


def test_a_jsonl_file_yields_every_line_good_or_bad(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"ticket": "T"}).encode() + b"\n\n{bad\n\xff\xfe\n[1]\n" + b"[" * 5000 + b"\n"
    )
    got = list(read_input_lines(path))
    assert got[0] == (1, {"ticket": "T"})  # a byte-order mark is not part of the record
    assert [n for n, _ in got] == [1, 3, 4, 5, 6]
    assert got[1][1].startswith("not valid JSON") and got[2][1].startswith("not UTF-8 text")
    assert got[3][1] == "expected a JSON object, got an array"
    assert "nested deeper" in got[4][1] or got[4][1].startswith("not valid JSON")
