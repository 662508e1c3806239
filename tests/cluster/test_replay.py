"""Replay re-sends one recorded request N times to the simulator and measures each outcome's rate."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tailrace.cluster.cli import main
from tailrace.cluster.replay import classify, load_target, run_replay, wilson
from tailrace.cluster.trace import TraceConfig, TraceWriter
from tailrace.engine.clock import SYSTEM_CLOCK, RunDeadline
from tailrace.engine.errors import InputError
from tailrace.engine.loading import load_inputs, load_workflow
from tailrace.engine.outcomes import RunOutcome
from tailrace.engine.providers.base import AdapterSettings, build_adapter
from tailrace.engine.sim import Fault
from tailrace.runtime.step_runner import StepRequest, StepRunner

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support_triage"
DEMO = load_workflow(EXAMPLE / "workflow.yaml")
RECORD = next(r for _, r in load_inputs(EXAMPLE / "inputs.jsonl"))
FAULTS = {Fault.SCHEMA_MISS: 0.3, Fault.HTTP_500: 0.1, Fault.TRUNCATED: 0.1}


def providers(sim) -> dict[str, AdapterSettings]:
    return {
        "openai": AdapterSettings(kind="openai", base_url=sim.openai_base_url, api_key="sim"),
        "anthropic": AdapterSettings(kind="anthropic", base_url=sim.anthropic_base_url, api_key="sim"),
    }


def record_trace(sim, path: Path, redact: bool = False) -> None:
    """One real run of the `classify` step through the step runner, traced as the driver traces it."""

    async def once():
        adapters = {name: build_adapter(s, SYSTEM_CLOCK) for name, s in providers(sim).items()}
        try:
            request = StepRequest(
                run_id="run-1",
                workflow=DEMO.name,
                tenant="t",
                step=DEMO.step("classify"),
                inputs=RECORD,
                upstream={},
                deadline=RunDeadline(SYSTEM_CLOCK.time() + 30),
            )
            return await StepRunner(adapters).run(request)
        finally:
            for adapter in adapters.values():
                await adapter.aclose()

    result = asyncio.run(once())
    outcome = RunOutcome(
        run_id="run-1",
        workflow=DEMO.name,
        tenant="t",
        delivered=result.ok,
        started_at=0,
        ended_at=1,
        deadline_at=30,
        latency_s=1,
        attempts=result.attempts,
    )
    writer = TraceWriter(TraceConfig(path=str(path), redact_prompts=redact), DEMO)
    writer.write(outcome, RECORD)
    writer.close()


def test_replay_measures_outcome_rates_on_the_simulator(simulator, tmp_path):
    trace = tmp_path / "trace.jsonl"
    record_trace(simulator("clean", seed=5, time_scale=0.01), trace)
    target = load_target(trace, "classify")
    assert target.request.model == "gpt-4.1" and "TCK" in target.request.prompt
    faulty = simulator("clean", seed=9, time_scale=0.01, fault_rates=FAULTS)
    result = run_replay(target, providers(faulty), n=200, concurrency=16)
    rates = {label: rate for label, _, rate, _, _ in result.rates()}
    assert sum(result.outcomes.values()) == 200
    assert set(rates) == {"valid", "invalid: schema", "error: server_error", "truncated"}
    assert rates["valid"] == pytest.approx(0.5, abs=0.12)
    assert rates["invalid: schema"] == pytest.approx(0.3, abs=0.1)
    assert rates["error: server_error"] == pytest.approx(0.1, abs=0.07)
    assert rates["truncated"] == pytest.approx(0.1, abs=0.07)
    assert result.cost_usd > 0 and result.input_tokens > 0
    # Every replay was the recorded request, byte for byte: the simulator saw one content 200 times.
    log = faulty.log_records()
    assert sorted(r["occurrence"] for r in log) == list(range(200))
    assert {(r["model"], r["input_tokens"]) for r in log} == {("gpt-4.1", log[0]["input_tokens"])}


def test_replay_command_reports_rates(simulator, tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    record_trace(simulator("clean", seed=5, time_scale=0.01), trace)
    code = main(
        [
            "replay",
            str(trace),
            "--step",
            "classify",
            "--n",
            "20",
            "--scenario",
            "clean",
            "--time-scale",
            "0.01",
            "--json",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert data["n"] == 20 and data["outcomes"] == [
        {"outcome": "valid", "count": 20, "rate": 1.0, "low": pytest.approx(0.839, abs=0.01), "high": 1.0}
    ]


def test_a_redacted_trace_cannot_be_replayed(simulator, tmp_path):
    trace = tmp_path / "trace.jsonl"
    record_trace(simulator("clean", seed=5, time_scale=0.01), trace, redact=True)
    with pytest.raises(InputError, match="redact"):
        load_target(trace, "classify")
    with pytest.raises(InputError, match="no recorded attempt"):
        load_target(trace, "nope")


@pytest.mark.parametrize(
    ("error", "ok", "reason", "label"),
    [
        (None, True, None, "valid"),
        ("rate_limited", False, None, "error: rate_limited"),
        (None, False, "truncated", "truncated"),
        (None, False, "refused", "refused"),
        (None, False, "schema: 'intent' is a required property", "invalid: schema"),
        (None, False, "validator:no_pii: found an email", "invalid: validator:no_pii"),
        (None, False, "missing_id: ticket_id", "invalid: missing_id: ticket_id"),
        (None, False, "not_json", "invalid: not_json"),
    ],
)
def test_outcome_labels(error, ok, reason, label):
    assert classify(error, ok, reason) == label


def test_wilson_interval():
    low, high = wilson(30, 100)
    assert low == pytest.approx(0.219, abs=0.002) and high == pytest.approx(0.396, abs=0.002)
