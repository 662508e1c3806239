"""Bad input reaches the user as one clear paragraph and exit status 2, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailrace.cluster.cli import DEMO_WORKFLOW, main

CYCLE = """
name: cyc
inputs: [x]
steps:
  - {id: a, prompt: "{{input.x}}", depends_on: [c], models: [{provider: openai, model: m, max_tokens: 5}]}
  - {id: b, prompt: "{{input.x}}", depends_on: [a], models: [{provider: openai, model: m, max_tokens: 5}]}
  - {id: c, prompt: "{{input.x}}", depends_on: [b], models: [{provider: openai, model: m, max_tokens: 5}]}
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "cycle.yaml").write_text(CYCLE)
    (tmp_path / "ok.jsonl").write_text('{"x": 1}\n')
    (tmp_path / "broken.jsonl").write_text(
        '{"ticket_id": "T", "order_id": "O", "customer": "c", "message": "m"}\n{oops\n'
    )
    (tmp_path / "missing_field.jsonl").write_text('{"ticket_id": "T"}\n')
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "{d}/cycle.yaml", "--inputs", "{d}/ok.jsonl"], "cycle: a -> b -> c -> a"),
        (["run", "{d}/nowhere.yaml", "--inputs", "{d}/ok.jsonl"], "nowhere.yaml"),
        (["run", str(DEMO_WORKFLOW), "--inputs", "{d}/absent.jsonl"], "absent.jsonl"),
        (["run", str(DEMO_WORKFLOW), "--inputs", "{d}/broken.jsonl"], "broken.jsonl:2: not valid JSON"),
        (["run", str(DEMO_WORKFLOW), "--inputs", "{d}/missing_field.jsonl"], "missing input field(s): order_id"),
        (["demo", "--deadline", "-1"], "--deadline"),
    ],
)
def test_bad_input_is_one_clear_error(files, capsys, argv, expected):
    code = main([a.format(d=files) for a in argv])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["demo", "--deadlin", "5"], ["run", str(DEMO_WORKFLOW), "--input", "x.jsonl"]])
def test_flags_are_never_matched_by_prefix(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "the following arguments are required: --inputs" in err


def test_budget_status_without_a_cluster_says_how_to_name_one_and_starts_none(tmp_path):
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TAILRACE_REDIS_URL")}
    env["RAY_TMPDIR"] = str(tmp_path)  # no `ray start` cluster recorded here
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tailrace.cluster.cli", "budget", "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    err = " ".join(done.stderr.split())
    assert "no Ray cluster is running on this machine" in err and "--address" in err and "Traceback" not in err
    assert time.monotonic() - started < 30
    assert not (tmp_path / "ray").exists()  # no throwaway cluster was started


def test_results_of_a_job_on_this_machine_are_copied_and_summarised(tmp_path, capsys):
    from tailrace.engine.outcomes import RunOutcome

    sid = "tailrace-demo-0123456789ab"
    (tmp_path / "jobs" / sid).mkdir(parents=True)
    outcome = RunOutcome(
        run_id="r1", workflow="demo", tenant="t", delivered=True, started_at=0.0, ended_at=1.5, deadline_at=20.0,
        latency_s=1.5,
    )  # fmt: skip
    (tmp_path / "jobs" / sid / "results.jsonl").write_text(outcome.model_dump_json() + "\n")
    out = tmp_path / "mine.jsonl"
    code = main(["results", sid, "--results-dir", str(tmp_path / "jobs"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.read_text() == outcome.model_dump_json() + "\n"
    assert "demo: 1 runs, deadline 20 s" in printed and f"report: tailrace report {out}" in " ".join(printed.split())
