"""Job submission pieces that need no cluster: idempotent ids, the auth header, the runtime env."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tailrace.cluster import jobs
from tailrace.cluster.cli import main
from tailrace.engine.errors import InputError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support_triage"


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    shutil.copy(EXAMPLE / "workflow.yaml", tmp_path / "workflow.yaml")
    shutil.copy(EXAMPLE / "inputs.jsonl", tmp_path / "inputs.jsonl")
    return tmp_path


def test_the_same_batch_gets_the_same_id_and_any_change_a_new_one(batch_dir):
    wf, inputs = batch_dir / "workflow.yaml", batch_dir / "inputs.jsonl"
    args = jobs.BatchArgs("workflow.yaml", "inputs.jsonl", {"deadline_s": 20})
    first = jobs.submission_id_for(wf, inputs, args)
    assert first.startswith("tailrace-support-triage-") and first == jobs.submission_id_for(wf, inputs, args)
    # Executor sizing does not change what the batch computes: same id.
    assert (
        jobs.submission_id_for(
            wf, inputs, jobs.BatchArgs("workflow.yaml", "inputs.jsonl", {"deadline_s": 20}, pool={"max_executors": 9})
        )
        == first
    )
    assert (
        jobs.submission_id_for(wf, inputs, jobs.BatchArgs("workflow.yaml", "inputs.jsonl", {"deadline_s": 25})) != first
    )
    inputs.write_text(inputs.read_text() + inputs.read_text().splitlines()[0] + "\n")
    assert jobs.submission_id_for(wf, inputs, args) != first


def test_auth_header_comes_from_the_token_env_or_file_and_never_when_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-from-env")
    assert jobs.auth_headers() == {"Authorization": "Bearer tok-from-env"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "token").write_text("tok-from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert jobs.auth_headers() == {"Authorization": "Bearer tok-from-file"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_headers() == {}


def test_runtime_env_ships_code_and_dependencies_but_never_keys(batch_dir, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-never-travel-0000000000")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://llm.internal/v1")
    env = jobs.runtime_env(batch_dir, pip=["rapidfuzz==3.9"], env_vars=jobs.forwarded_env())
    assert env["working_dir"] == str(batch_dir)
    [shipped] = env["py_modules"]
    assert Path(shipped).name == "tailrace"  # one package, never generic top-level names
    for module in (
        "__init__.py",
        "engine/clock.py",
        "engine/sim/server.py",
        "policies/hedging.py",
        "runtime/step_runner.py",
        "runtime/budget_exchange.lua",
        "actors/step_executor.py",
        "cluster/jobs.py",
    ):
        assert (Path(shipped) / module).is_file(), module
    assert not list(Path(shipped).rglob("__pycache__"))
    assert env["pip"] == ["rapidfuzz==3.9"]
    assert env["env_vars"]["OPENAI_BASE_URL"] == "http://llm.internal/v1"
    assert "sk-should-never-travel" not in str(env)


def test_job_command_line_round_trips(batch_dir):
    args = jobs.BatchArgs(
        "workflow.yaml",
        "inputs.jsonl",
        {"deadline_s": 20, "tenant": "acme"},
        concurrency=8,
        scenario="clean",
        seed=3,
        time_scale=0.05,
        pool={"max_executors": 4},
        redact_prompts=True,
    )
    parsed = jobs._job_parser().parse_args(args.argv("tailrace-x-1", "/data/jobs"))
    assert (parsed.workflow, parsed.inputs, parsed.submission_id, parsed.results_dir) == (
        "workflow.yaml",
        "inputs.jsonl",
        "tailrace-x-1",
        "/data/jobs",
    )
    assert (parsed.scenario, parsed.seed, parsed.time_scale, parsed.concurrency, parsed.redact_prompts) == (
        "clean",
        3,
        0.05,
        8,
        True,
    )


def test_inputs_outside_the_working_dir_are_refused_before_contacting_anyone(batch_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "inputs.jsonl"
    shutil.copy(batch_dir / "inputs.jsonl", elsewhere)
    with pytest.raises(InputError, match="outside the working dir"):
        jobs.submit(batch_dir / "workflow.yaml", elsewhere, address="http://127.0.0.1:9")


def test_an_unreachable_cluster_is_one_clear_error(batch_dir, capsys):
    code = main(
        [
            "submit",
            str(batch_dir / "workflow.yaml"),
            "--inputs",
            str(batch_dir / "inputs.jsonl"),
            "--address",
            "http://127.0.0.1:9",
        ]
    )
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "cannot reach the Ray job server at http://127.0.0.1:9" in err and "Traceback" not in err


def test_a_job_runs_on_this_interpreter_when_the_cluster_is_on_this_machine(monkeypatch):
    import socket
    import sys

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.job_python(None, None) == (sys.executable, True)  # the default job server is local
    assert jobs.job_python(None, "http://localhost:8265") == (sys.executable, True)
    assert jobs.job_python(None, f"http://{socket.gethostname()}:8265") == (sys.executable, True)
    assert jobs.job_python(None, "http://head.example.invalid:8265") == ("python", False)
    assert jobs.job_python("/opt/py/bin/python", None) == ("/opt/py/bin/python", False)


def test_an_interpreter_without_ray_fails_the_job_at_once_saying_what_to_do(tmp_path):
    import subprocess

    no_ray = tmp_path / "python"
    no_ray.write_text("#!/bin/sh\nexit 1\n")  # `import ray` fails, as with the shell's python of a bare venv
    no_ray.chmod(0o755)
    command = jobs.entrypoint(str(no_ray), False, ["run", "--workflow", "w.yaml"])
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)
    assert done.returncode == 3
    assert f"tailrace: '{no_ray}' on the head node cannot import ray: pass --python" in done.stdout
    assert jobs.entrypoint("/v/bin/python", True, ["run"]) == "/v/bin/python -m tailrace.cluster.jobs run"
