"""A results file resumes the batch that wrote it, and only that batch."""

from __future__ import annotations

import json

import pytest

from tailrace.cluster.resume import BatchIdentity, resume, sidecar_path
from tailrace.engine.errors import InputError
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.specs import RunOptions

SPEC = workflow_from_dict(
    {
        "name": "w",
        "inputs": ["x"],
        "steps": [
            {"id": "a", "prompt": "{{input.x}}", "models": [{"provider": "openai", "model": "m", "max_tokens": 5}]}
        ],
    }
)


def write_runs(path, *ids):
    with path.open("a") as f:
        for run_id in ids:
            f.write(json.dumps({"run_id": run_id}) + "\n")


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_text('{"x": 1}\n{"x": 2}\n')
    return path


def test_the_same_batch_skips_what_it_finished_and_says_so(tmp_path, inputs):
    out = tmp_path / "results.jsonl"
    same = BatchIdentity.of(SPEC, inputs, RunOptions(deadline_s=20))
    first = resume(out, same)
    assert first.skip == set() and first.note is None and sidecar_path(out).is_file()
    write_runs(out, "run-000001", "run-000002")
    again = resume(out, same)
    assert again.skip == {"run-000001", "run-000002"}
    assert "already holds 2 finished runs of the same workflow, inputs and options" in again.note
    assert "--fresh" in again.note


def test_another_batch_is_refused_with_what_differs_until_fresh(tmp_path, inputs):
    out = tmp_path / "results.jsonl"
    resume(out, BatchIdentity.of(SPEC, inputs, RunOptions(deadline_s=20)))
    write_runs(out, "run-000001")
    (tmp_path / "results.trace.jsonl").write_text("{}\n")
    other = BatchIdentity.of(SPEC, inputs, RunOptions(deadline_s=8))
    with pytest.raises(InputError, match=r"holds 1 runs of another batch \(deadline_s 20.0 -> 8.0\).*--fresh"):
        resume(out, other)
    inputs.write_text('{"x": 3}\n')
    with pytest.raises(InputError, match="the inputs changed"):
        resume(out, BatchIdentity.of(SPEC, inputs, RunOptions(deadline_s=20)))
    fresh = resume(out, other, fresh=True)
    assert fresh.skip == set() and not out.exists() and not (tmp_path / "results.trace.jsonl").exists()
    assert json.loads(sidecar_path(out).read_text())["options"]["deadline_s"] == 8.0


def test_a_results_file_from_before_batch_keys_is_resumed_as_it_was(tmp_path, inputs):
    out = tmp_path / "results.jsonl"
    write_runs(out, "a")
    state = resume(out, BatchIdentity.of(SPEC, inputs, RunOptions()))
    assert state.skip == {"a"} and "unknown options" in state.note
