"""Traces (every attempt, secrets and optionally prompts redacted) and the tail report with its plot,
from results files written the way the driver writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailrace.cluster.cli import main
from tailrace.cluster.report import build_report, critical_path, describe_path, plot_cdf, read_results
from tailrace.cluster.results import ResultWriter
from tailrace.cluster.trace import REDACTED, Redactor, TraceConfig, TraceWriter, default_trace_path, read_trace
from tailrace.engine.dag import Dag
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import (
    AttemptOutcome,
    AttemptRecord,
    AttemptRequest,
    CancelReason,
    ErrorKind,
    FailureReason,
    ProviderError,
    RunOutcome,
)

T0 = 1_700_000_000.0
WORKFLOW = workflow_from_dict(
    {
        "name": "diamond",
        "inputs": ["x"],
        "steps": [
            {"id": "a", "prompt": "{{input.x}}", "models": [{"provider": "openai", "model": "m1", "max_tokens": 50}]},
            {
                "id": "b",
                "prompt": "{{steps.a}}",
                "depends_on": ["a"],
                "models": [{"provider": "openai", "model": "m1", "max_tokens": 50}],
            },
            {
                "id": "c",
                "prompt": "{{steps.a}}",
                "depends_on": ["a"],
                "models": [{"provider": "openai", "model": "m1", "max_tokens": 50}],
            },
            {
                "id": "d",
                "prompt": "{{steps.b}} {{steps.c}}",
                "depends_on": ["b", "c"],
                "models": [{"provider": "openai", "model": "m1", "max_tokens": 50}],
            },
        ],
    }
)


def attempt(
    step: str,
    n: int,
    start: float,
    end: float,
    outcome: AttemptOutcome = AttemptOutcome.VALID,
    tokens: int = 100,
    run: str = "r",
    **extra,
) -> AttemptRecord:
    return AttemptRecord(
        run_id=run,
        step_id=step,
        attempt=n,
        provider="openai",
        model=extra.pop("model", "m1"),
        started_at=T0 + start,
        ended_at=T0 + end,
        latency_s=end - start,
        ttft_s=0.1,
        input_tokens=tokens // 2,
        output_tokens=tokens // 2,
        cost_usd=tokens * 1e-6,
        outcome=outcome,
        request=AttemptRequest(
            provider="openai", kind="openai", model="m1", prompt=f"prompt of {step}", system="sys", max_tokens=50
        ),
        **extra,
    )


def run(
    run_id: str,
    latency: float,
    attempts: list[AttemptRecord],
    delivered: bool = True,
    deadline: float = 10.0,
    failure: FailureReason | None = None,
) -> RunOutcome:
    return RunOutcome(
        run_id=run_id,
        workflow="diamond",
        tenant="t",
        delivered=delivered,
        failure=failure,
        started_at=T0,
        ended_at=T0 + latency,
        deadline_at=T0 + deadline,
        latency_s=latency,
        cost_usd=sum(a.cost_usd for a in attempts),
        attempts=[a.model_copy(update={"run_id": run_id}) for a in attempts],
    )


def slow_run() -> RunOutcome:
    # a 0-1; b 1-2 (fast); c 1-5 with a losing hedge; d 5.2-6: the critical path is a -> c -> d.
    return run(
        "slow",
        6.1,
        [
            attempt("a", 0, 0.0, 1.0),
            attempt("b", 0, 1.05, 2.0),
            attempt("c", 0, 1.05, 5.0),
            attempt(
                "c", 1, 3.0, 5.0, AttemptOutcome.CANCELLED, cancel_reason=CancelReason.HEDGE_LOST, role="duplicate"
            ),
            attempt("d", 0, 5.2, 6.0),
        ],
    )


def batch() -> list[RunOutcome]:
    runs = [
        run(
            f"r{i}",
            1.0 + i * 0.1,
            [attempt("a", 0, 0, 0.3), attempt("b", 0, 0.3, 0.6), attempt("c", 0, 0.3, 0.7), attempt("d", 0, 0.7, 1.0)],
        )
        for i in range(8)
    ]
    runs.append(slow_run())
    runs.append(
        run(
            "late",
            10.3,
            [
                attempt(
                    "a",
                    0,
                    0,
                    0.5,
                    AttemptOutcome.ERROR,
                    tokens=40,
                    error=ProviderError(kind=ErrorKind.RATE_LIMITED, retryable=True, status=429),
                ),
                attempt("a", 1, 0.6, 10.2, AttemptOutcome.CANCELLED, tokens=60, cancel_reason=CancelReason.DEADLINE),
            ],
            delivered=False,
            failure=FailureReason.DEADLINE_EXCEEDED,
        )
    )
    return runs


@pytest.fixture
def results_file(tmp_path: Path) -> Path:
    out = tmp_path / "results.jsonl"
    writer = ResultWriter(out)
    tracer = TraceWriter(TraceConfig(path=str(default_trace_path(out))), WORKFLOW)
    for outcome in batch():
        writer.write(outcome)
        tracer.write(outcome, {"x": "hello"})
    writer.close()
    tracer.close()
    return out


def test_report_numbers(results_file):
    report = build_report(read_results(results_file), WORKFLOW)
    assert (report.runs, report.delivered, report.on_time) == (10, 9, 9)
    assert report.hit_rate == pytest.approx(0.9)
    assert report.failures == {"deadline_exceeded": 1}
    assert report.percentiles["p50"] == pytest.approx(1.4)  # nearest rank of 10 sorted latencies
    assert report.percentiles["max"] == pytest.approx(10.3)
    # Waste: the slow run's losing hedge (100) and every attempt of the failed run (40 + 60).
    assert report.wasted_tokens == 200
    assert report.tokens == 8 * 400 + 500 + 100
    assert report.cost_per_delivered_usd == pytest.approx(report.cost_usd / 9)
    assert report.attempts_by_outcome == {"valid": 36, "cancelled": 2, "error": 1}
    assert report.cancel_reasons == {"hedge_lost": 1, "deadline": 1}
    assert [r.run_id for r in report.slowest[:2]] == ["late", "slow"]


def test_critical_path_follows_the_dependency_that_ended_last():
    legs = critical_path(slow_run(), Dag.from_spec(WORKFLOW))
    assert [leg.span.step_id for leg in legs] == ["a", "c", "d"]
    assert legs[2].wait_s == pytest.approx(0.2)
    assert legs[1].span.attempts == 2
    # Without the workflow, timing alone finds the same chain.
    assert [leg.span.step_id for leg in critical_path(slow_run())] == ["a", "c", "d"]
    report = build_report([slow_run()], WORKFLOW)
    text = describe_path(report.slowest[0])
    assert text == (
        "a 1.00 s (m1, 1 attempt) -> wait 0.05 -> c 3.95 s (m1, 2 attempts) -> wait 0.20 -> "
        "d 0.80 s (m1, 1 attempt) -> wait 0.10"
    )


def test_plot_is_written_and_readable(results_file, tmp_path):
    png = plot_cdf(build_report(read_results(results_file)), tmp_path / "cdf.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_report_command_prints_and_plots(results_file, capsys):
    assert main(["report", str(results_file), "--slowest", "2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "90.0%" in out and "per delivered run" in out and "waste: 200 of" in out
    assert "slow 6.10 s delivered" in out and "c 3.95 s (m1, 2 attempts)" in out
    assert (results_file.parent / "results.cdf.png").is_file()
    assert main(["report", str(results_file), "--json", "--no-plot"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hit_rate"] == pytest.approx(0.9) and data["wasted_tokens"] == 200


def test_trace_lines_say_why_each_attempt_lost(results_file):
    lines = list(read_trace(default_trace_path(results_file)))
    assert lines[0]["kind"] == "batch" and lines[0]["workflow"]["name"] == "diamond"
    attempts = [line for line in lines if line["kind"] == "attempt"]
    assert len(attempts) == 39 and sum(line["kind"] == "run" for line in lines) == 10
    why = {(a["run_id"], a["step_id"], a["attempt"]): a["why_lost"] for a in attempts}
    assert why[("slow", "c", 0)] is None and why[("slow", "c", 1)] == "hedge_lost"
    assert why[("late", "a", 0)] == "error: rate_limited" and why[("late", "a", 1)] == "deadline"
    assert attempts[0]["request"]["prompt"].startswith("prompt of")
    # The results file keeps outcomes lean: requests live only in the trace.
    assert "request" not in json.loads(results_file.read_text().splitlines()[0])["attempts"][0]


def test_secrets_never_reach_a_trace_and_prompts_are_redacted_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", "hunter2-very-secret-value")
    leaky = attempt(
        "a",
        0,
        0,
        1,
        AttemptOutcome.ERROR,
        error=ProviderError(
            kind=ErrorKind.AUTH,
            retryable=False,
            status=401,
            message="Incorrect API key provided: sk-proj-abcdefghijklmnop1234. token=hunter2-very-secret-value",
        ),
    )
    leaky = leaky.model_copy(
        update={
            "request": leaky.request.model_copy(
                update={"prompt": "connect to redis://app:s3cretpass@db:6379 with Bearer abcdefghijk12345"}
            )
        }
    )
    outcome = run("leak", 1.0, [leaky], delivered=False, failure=FailureReason.PROVIDER_ERROR)
    plain = tmp_path / "plain.jsonl"
    TraceWriter(TraceConfig(path=str(plain)), WORKFLOW).write(outcome, {"x": "customer secret story"})
    text = plain.read_text()
    for secret in ("sk-proj-abcdefghijklmnop1234", "hunter2-very-secret-value", "s3cretpass", "abcdefghijk12345"):
        assert secret not in text
    assert REDACTED in text and "customer secret story" in text  # prompts kept unless asked
    redacted = tmp_path / "redacted.jsonl"
    TraceWriter(TraceConfig(path=str(redacted), redact_prompts=True), WORKFLOW).write(outcome, {"x": "customer story"})
    lines = list(read_trace(redacted))
    assert "customer story" not in redacted.read_text()
    assert lines[-1]["request"]["prompt"].startswith("[REDACTED ") and lines[1]["inputs"]["x"] == "[REDACTED 14 chars]"


def test_redactor_leaves_ordinary_text_alone():
    r = Redactor(secrets=[])
    assert r.scrub("ticket TCK-1042: the token bucket refilled; see https://example.com/a") == (
        "ticket TCK-1042: the token bucket refilled; see https://example.com/a"
    )


def test_without_matplotlib_the_report_says_how_to_get_the_plot(results_file, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
    assert main(["report", str(results_file)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "pip install 'tailrace[plot]'" in out and "hit rate" in out


def test_a_batch_where_nothing_was_delivered_still_plots(tmp_path):
    failed = [run(f"f{i}", 2.0 + i, [], delivered=False, failure=FailureReason.DEADLINE_EXCEEDED) for i in range(3)]
    report = build_report(failed)
    assert report.delivered == 0 and report.cost_per_delivered_usd is None
    assert plot_cdf(report, tmp_path / "none.png").stat().st_size > 10_000
