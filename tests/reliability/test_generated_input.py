"""Generated specs and input records: every case is a spec, or one clear error naming the field, or a typed
failure of its own run; never another exception, never a traceback out of `run_batch` or the CLI, never
over a second of this process's CPU time (the machine's load is not ours to measure). Deterministic
(derandomized) and bounded per example, so CI sees the same cases each time."""

from __future__ import annotations

import json
import math
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from run_checks import assert_each_run_once, assert_each_run_typed_and_on_time
from spec_strategies import GOOD_RECORD, records, specs, yaml_alias_bomb

from tailrace.cluster.api import run_batch
from tailrace.cluster.cli import main
from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.engine.errors import SpecErrors
from tailrace.engine.loading import load_workflow, workflow_from_dict
from tailrace.engine.specs import RunOptions, WorkflowSpec

FAST_CHECKS = settings(
    max_examples=120,
    deadline=None,  # the bound is asserted per example below, on the real clock, generously
    derandomize=True,
    database=None,  # derandomized: nothing to replay, and no .hypothesis folder in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
ONE_SECOND = 1.0


def _assert_clear(errors: SpecErrors) -> None:
    assert errors.errors, "an error with no problem in it"
    for e in errors.errors:
        assert e.field and e.message, e
        str(e).encode("utf-8")  # printable: no lone surrogate quoted back
    assert len(str(errors)) < 20_000, "an error message that does not fit a screen or two"


def _load(load) -> WorkflowSpec | SpecErrors:  # type: ignore[no-untyped-def]
    started = time.process_time()
    try:
        result: WorkflowSpec | SpecErrors = load()
    except SpecErrors as exc:
        result = exc
    elapsed = time.process_time() - started
    assert elapsed < ONE_SECOND, f"took {elapsed:.2f} s"
    if isinstance(result, SpecErrors):
        _assert_clear(result)
    return result


@FAST_CHECKS
@given(specs(in_python=True))
def test_a_generated_spec_from_python_is_a_spec_or_clear_errors(data):
    result = _load(lambda: workflow_from_dict(data))
    if isinstance(result, WorkflowSpec):  # accepted: then every number in it is finite
        dumped = json.dumps(
            result.model_dump(mode="json", exclude={"steps": {"__all__": {"output": {"schema_model"}}}})
        )
        assert "Infinity" not in dumped and "NaN" not in dumped


@FAST_CHECKS
@given(specs(in_python=False), st.sampled_from(["json", "yaml"]))
def test_a_generated_spec_file_is_a_spec_or_clear_errors(tmp_path_factory, data, fmt):
    path = tmp_path_factory.mktemp("spec") / f"workflow.{fmt}"
    try:
        text = json.dumps(data) if fmt == "json" else yaml.safe_dump(data, allow_unicode=False)
    except (ValueError, RecursionError, yaml.YAMLError):
        return  # not expressible in this format
    path.write_text(text, encoding="utf-8")
    _load(lambda: load_workflow(path))


@pytest.mark.parametrize(("levels", "fanout"), [(9, 9), (4, 8), (30, 2)])
def test_yaml_aliases_that_expand_are_refused_at_once(tmp_path, levels, fanout):
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml_alias_bomb(levels, fanout))
    assert len(path.read_bytes()) < 1_000
    result = _load(lambda: load_workflow(path))
    expanded = fanout**levels
    if expanded > 20_000:
        assert isinstance(result, SpecErrors) and "expands to more than" in str(result), result
    else:  # small enough to load: then its schema is within the size that goes into every prompt
        assert isinstance(result, WorkflowSpec | SpecErrors)


@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(specs(in_python=False))
def test_the_cli_never_prints_a_traceback_for_a_generated_spec(tmp_path_factory, capsys, data):
    spec = tmp_path_factory.mktemp("cli") / "workflow.json"
    spec.write_text(json.dumps(data))
    try:
        workflow_from_dict(json.loads(spec.read_text()))
        return  # a valid spec would start a batch: not this test's business
    except SpecErrors:
        pass
    inputs = spec.with_name("inputs.jsonl")
    inputs.write_text(json.dumps(GOOD_RECORD) + "\n")
    code = main(["run", str(spec), "--inputs", str(inputs)])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "Traceback" not in err, err


def test_the_cli_reports_an_unexpected_error_in_one_paragraph(tmp_path, capsys, monkeypatch):
    import tailrace.cluster.cli_run as cli_run

    def broken(args):  # type: ignore[no-untyped-def]
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(cli_run, "run_batch_command", broken)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err

    def bug(args):  # type: ignore[no-untyped-def]
        raise KeyError("sk-abcdefghijklmnopqrstuvwx")

    monkeypatch.setattr(cli_run, "run_batch_command", bug)
    assert main(["demo"]) == 70
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "Traceback" not in err and "abcdefghijklmnop" not in err


# ---- input records, through run_batch on real executors -----------------------------------------------

SPEC = workflow_from_dict(
    {
        "name": "gen_records",
        "inputs": ["ticket", "meta"],
        "steps": [
            {
                "id": "read",
                "prompt": "Ticket {{input.ticket}}: {{input.meta.k}}",
                "models": [{"provider": "openai", "model": "gpt-4.1-mini", "max_tokens": 40}],
            }
        ],
    }
)


@pytest.mark.usefixtures("ray_cluster")
# Few, large examples: each is one batch on a fresh executor pool, which costs seconds to start.
@settings(max_examples=2, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(records(), min_size=20, max_size=30))
def test_generated_records_each_end_typed_and_written_once(simulator, tmp_path_factory, batch):
    sim = simulator("clean", seed=4, time_scale=0.02)
    out = tmp_path_factory.mktemp("records") / "results.jsonl"
    outcomes = []
    started = time.monotonic()
    summary = run_batch(
        SPEC,
        batch,
        options=RunOptions(deadline_s=5),
        out=out,
        simulator=SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url),
        grace_s=0.5,
        on_done=outcomes.append,
    )
    assert time.monotonic() - started < 60, "the batch hung"
    assert summary.runs == len(batch) == len(outcomes)
    assert_each_run_typed_and_on_time(outcomes, grace_s=0.5)
    lines = assert_each_run_once(out, len(batch))
    for line in lines:
        assert line["delivered"] or line["failure"] in {"invalid_input", "provider_error", "deadline_exceeded"}, line
        assert math.isfinite(line["cost_usd"])
        if line["failure"] == "invalid_input":
            assert line["attempts"] == [] and line["detail"], line
    by_id = {line["run_id"]: line for line in lines}
    for number, record in enumerate(batch, start=1):
        if record == GOOD_RECORD:  # no id: it runs as run-<line>, and nothing is wrong with it
            assert by_id[f"run-{number:06d}"]["delivered"], by_id[f"run-{number:06d}"]
