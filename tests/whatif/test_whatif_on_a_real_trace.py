"""`whatif` and `tune` from the CLI and from Python, on a trace a real batch wrote: the demo workflow on
Ray executors, real SDKs, the simulator (heavy-tail, time-scaled)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tailrace
from tailrace.cluster.api import run_batch
from tailrace.cluster.cli import main
from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.engine.loading import load_inputs, load_workflow
from tailrace.engine.specs import HedgeConfig, RunOptions
from tailrace.policies.hedging import TailTuning, scaled_hedge
from tailrace.whatif.prediction import trace_metrics
from tailrace.whatif.trace_data import read_trace

pytestmark = pytest.mark.usefixtures("ray_cluster")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support_triage"
SCALE = 0.05
RUNS = 80
DEADLINE_S = 3.0  # real seconds: generous, so a loaded machine's engine overhead does not decide


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tailrace.engine.sim import SimServer, scenario

    spec = load_workflow(EXAMPLE / "workflow.yaml")
    steps = [
        s.model_copy(
            update={
                "models": [
                    m.model_copy(
                        update={
                            "expected_ttft_s": m.expected_ttft_s * SCALE,
                            "expected_latency_s": m.expected_latency_s * SCALE,
                        }
                    )
                    for m in s.models
                ]
            }
        )
        for s in spec.steps
    ]
    spec = spec.model_copy(update={"steps": steps})
    base = [r for _, r in load_inputs(EXAMPLE / "inputs.jsonl")]
    records = []
    for i in range(RUNS):
        r = dict(base[i % len(base)])
        r["ticket_id"], r["order_id"], r["id"] = f"{r['ticket_id']}-{i}", f"{r['order_id']}-{i}", f"run-{i:03d}"
        records.append(r)
    out = tmp_path_factory.mktemp("whatif") / "results.jsonl"
    with SimServer.in_thread(scenario("heavy-tail", seed=5, time_scale=SCALE)) as sim:
        run_batch(
            spec,
            records,
            options=RunOptions(deadline_s=DEADLINE_S, max_cost_usd=0.05),
            out=out,
            simulator=SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url),
            hedge=scaled_hedge(HedgeConfig(), SCALE),
            tuning=TailTuning().scaled(SCALE),
            max_in_flight=16,
        )
    return out


def test_the_trace_records_what_the_batch_ran_with(results):
    data = read_trace(results)  # the results file finds its trace next to it
    assert data.notes == []
    assert len(data.runs) == RUNS and data.workflow.name == "support_triage"
    assert data.settings.max_in_flight == 16 and data.settings.executors == 2
    assert data.settings.hedge.stall_gap_s == pytest.approx(2.0 * SCALE)
    assert data.options().deadline_s == pytest.approx(DEADLINE_S)


def test_whatif_from_python_replays_the_trace(results):
    prediction = tailrace.what_if(results, replays=3)
    recorded = trace_metrics(read_trace(results))
    assert prediction.recorded == recorded
    assert prediction.runs == RUNS and len(prediction.samples) == 3
    assert prediction["hit_rate"].contains(recorded.hit_rate)
    assert 0.5 * recorded.p50 < prediction["p50"].mean < 2 * recorded.p50
    changed = tailrace.what_if(results, replays=2, deadline_s=0.2, hedge={"enabled": False})
    assert changed.change == "deadline 0.2 s; hedge enabled=False"
    assert changed["hit_rate"].mean < prediction["hit_rate"].mean  # a deadline that short misses runs


def test_whatif_and_tune_from_the_cli(results, capsys):
    assert main(["whatif", str(results), "--hedge", "ttft_quantile=0.8", "--replays", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["change"] == "hedge ttft_quantile=0.8"
    assert set(shown["predicted"]) >= {"hit_rate", "p99", "extra_tokens", "cost_per_delivered_usd", "rate_limited"}
    code = main(
        [
            "tune",
            str(results),
            "--target-hit",
            "0.5",
            "--max-extra-tokens",
            "5",
            "--runs",
            "20",
            "--screen-runs",
            "10",
            "--replays",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "meets the targets" in out and "paste into the workflow" in out


def test_bad_input_names_the_flag(results, capsys):
    def error() -> str:
        return " ".join(capsys.readouterr().err.split())

    assert main(["whatif", str(results), "--hedge", "ttft_quantil=0.8"]) == 2
    assert "--hedge: ttft_quantil: unknown setting; known:" in error()
    assert main(["whatif", str(results), "--ladder", "reply=gpt-5"]) == 2
    assert "ladder[reply]: gpt-5 is not on this step's ladder" in error()
    assert main(["whatif", str(results), "--tpm", "0"]) == 2
    assert "--tpm: Input should be greater than 0" in error()
    assert main(["whatif", str(results.with_name("nope.jsonl"))]) == 2
    assert "nope.trace.jsonl' does not exist" in error()
