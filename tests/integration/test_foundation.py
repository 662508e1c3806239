"""End to end on Ray and the simulator, over real HTTP through the real SDKs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tailrace.cluster.api import run_batch
from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.engine.loading import load_inputs, load_workflow, workflow_from_dict
from tailrace.engine.outcomes import AttemptOutcome, ErrorKind, FailureReason
from tailrace.engine.sim import Fault
from tailrace.engine.specs import RunOptions

pytestmark = pytest.mark.usefixtures("ray_cluster")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support_triage"
DEMO = load_workflow(EXAMPLE / "workflow.yaml")


def endpoints(sim) -> SimulatorEndpoints:
    return SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)


def demo_records(n: int) -> list[dict]:
    records = [r for _, r in load_inputs(EXAMPLE / "inputs.jsonl")]
    return [{**records[i % len(records)], "id": f"r{i}"} for i in range(n)]


def test_demo_workflow_on_clean_all_delivered_and_valid(simulator, tmp_path):
    sim = simulator("clean", seed=3, time_scale=0.05)
    out = tmp_path / "results.jsonl"
    summary = run_batch(
        DEMO, demo_records(60), options=RunOptions(deadline_s=20), out=out, simulator=endpoints(sim), max_in_flight=30
    )
    assert (summary.runs, summary.delivered, summary.on_time) == (60, 60, 60)
    outcomes = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outcomes) == 60
    for o in outcomes:
        record = next(r for r in demo_records(60) if r["id"] == o["run_id"])
        assert set(o["outputs"]) == {"reply", "crm_note"}
        assert record["ticket_id"] in o["outputs"]["reply"] and record["order_id"] in o["outputs"]["reply"]
        assert o["outputs"]["crm_note"]["ticket_id"] == record["ticket_id"]
        assert {a["step_id"] for a in o["attempts"] if a["outcome"] == "valid"} == {s.id for s in DEMO.steps}
        assert o["cost_usd"] > 0 and o["input_tokens"] > 0


TWO_PROVIDERS = {
    "name": "two_providers",
    "inputs": ["ticket_id"],
    "steps": [
        {
            "id": "draft",
            "prompt": "Draft a note on {{input.ticket_id}}.",
            "models": [{"provider": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 300}],
            "output": {"copy_ids": ["ticket_id"]},
        },
        {
            "id": "check",
            "depends_on": ["draft"],
            "prompt": "Check this note: {{steps.draft}}",
            "models": [{"provider": "openai", "model": "gpt-4o-mini", "max_tokens": 300}],
            "output": {
                "kind": "json",
                "json_schema": {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}},
            },
        },
    ],
}


def test_openai_and_anthropic_formats_both_used(simulator, tmp_path):
    log = tmp_path / "sim.jsonl"
    sim = simulator("clean", seed=1, time_scale=0.05, log_path=log)
    summary = run_batch(
        workflow_from_dict(TWO_PROVIDERS),
        [{"ticket_id": f"T-{i}"} for i in range(5)],
        options=RunOptions(deadline_s=10),
        simulator=endpoints(sim),
    )
    assert summary.delivered == 5
    apis = {r["api"] for r in sim.log_records()}
    assert apis == {"openai", "anthropic"}


def test_hanging_provider_ends_the_run_at_its_deadline(simulator, tmp_path):
    hang_all = {m: Fault.HANG for m in ("gpt-4.1", "claude-haiku-4-5", "gpt-4o-mini")}
    sim = simulator("clean", seed=1, time_scale=0.05, force_fault=hang_all)
    out = tmp_path / "results.jsonl"
    summary = run_batch(DEMO, demo_records(4), options=RunOptions(deadline_s=1.5), out=out, simulator=endpoints(sim))
    assert summary.failures == {"deadline_exceeded": 4}
    for o in map(json.loads, out.read_text().splitlines()):
        overrun = o["ended_at"] - o["deadline_at"]
        assert overrun < 0.5, f"run outlived its deadline by {overrun:.3f} s"
        assert o["failed_step"] == "classify"
        # The executor ends the step at its deadline; if it is starved, the driver's backstop stops it with
        # the same reason. Either way the hung attempt is on record, cancelled because the deadline came.
        assert o["attempts"] and all(
            a["outcome"] == "cancelled" and a["cancel_reason"] == "deadline" for a in o["attempts"]
        ), o["attempts"]
    # The hung HTTP requests were closed, not left running in the simulator.
    records = sim.log_records()
    for _ in range(50):
        if len(records) >= 4:
            break
        time.sleep(0.1)
        records = sim.log_records()
    assert len(records) >= 4 and all(r["cancelled"] for r in records)


def test_invalid_output_is_retried_and_the_final_output_is_valid(simulator):
    sim = simulator("clean", seed=1, time_scale=0.05, script={"gpt-4.1": [Fault.SCHEMA_MISS]})
    outcomes = []
    # 30 s: time for every step on its first rung (with less, the time allocator drops steps down the ladder).
    summary = run_batch(
        DEMO, demo_records(1), options=RunOptions(deadline_s=30), simulator=endpoints(sim), on_done=outcomes.append
    )
    assert summary.delivered == 1
    classify = [a for a in outcomes[0].attempts if a.step_id == "classify"]
    assert [a.outcome for a in classify] == [AttemptOutcome.INVALID, AttemptOutcome.VALID]
    assert classify[0].invalid_reason.startswith("schema")
    assert outcomes[0].outputs["crm_note"]["ticket_id"] == demo_records(1)[0]["ticket_id"]
    assert outcomes[0].degraded_steps == {"classify": "claude-haiku-4-5"}


def test_non_retryable_400_is_not_retried_on_the_same_model(simulator):
    sim = simulator("clean", seed=1, time_scale=0.05, force_fault={"gpt-4.1": Fault.CONTEXT_LENGTH})
    outcomes = []
    summary = run_batch(
        DEMO, demo_records(2), options=RunOptions(deadline_s=30), simulator=endpoints(sim), on_done=outcomes.append
    )
    assert summary.delivered == 2
    for outcome in outcomes:
        for step in DEMO.steps:
            attempts = [a for a in outcome.attempts if a.step_id == step.id]
            assert [a.model for a in attempts] == ["gpt-4.1", "claude-haiku-4-5"]
            assert attempts[0].error.kind == ErrorKind.CONTEXT_LENGTH and not attempts[0].error.retryable


def test_run_cost_cap_refuses_attempts_that_cannot_fit(simulator):
    sim = simulator("clean", seed=1, time_scale=0.05)
    summary = run_batch(
        DEMO, demo_records(2), options=RunOptions(deadline_s=10, max_cost_usd=0.000001), simulator=endpoints(sim)
    )
    assert summary.failures == {FailureReason.BUDGET_EXHAUSTED.value: 2}
    assert sim.log_records() == []  # nothing was sent that the budget had not admitted
