"""On a real multi-node cluster (`ray.cluster_utils.Cluster`: a head with the dashboard and two worker
nodes on this machine, Ray token auth on): batches as jobs, runs spread over nodes, a worker node
killed mid-batch, the pool growing onto a node added for its pending executors, and a driver-side
deadline stopping work on another node.

The module shuts the session's one-node cluster down for its duration and restores it afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

from tailrace.cluster import jobs
from tailrace.cluster.api import run_batch
from tailrace.cluster.cli import main
from tailrace.cluster.driver import WorkflowDriver, run_records
from tailrace.cluster.pool import ExecutorPool, PoolConfig
from tailrace.cluster.providers import SimulatorEndpoints, resolve_providers
from tailrace.cluster.results import BatchSummary, ResultWriter
from tailrace.engine.clock import SkewedClock
from tailrace.engine.loading import load_inputs, load_workflow
from tailrace.engine.outcomes import CancelReason, FailureReason
from tailrace.engine.sim import Fault
from tailrace.engine.specs import RunOptions

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support_triage"
DEMO = load_workflow(EXAMPLE / "workflow.yaml")
ON_WORKERS = {"tailrace_executor": 1}  # only the worker nodes offer this resource
HANG_ALL = {m: Fault.HANG for m in ("gpt-4.1", "claude-haiku-4-5", "gpt-4o-mini")}


@dataclass
class Env:
    cluster: Any
    address: str  # the dashboard (job server) URL
    workers: list[Any]

    def worker_ids(self) -> set[str]:
        return {n.node_id for n in self.workers}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env() -> Any:
    from conftest import start_session_ray
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray.cluster_utils import Cluster

    session_was_up = ray.is_initialized()
    if session_was_up:
        ray.shutdown()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)  # as `ray.init()` does for a new cluster
    port = _free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
            # The job agent's own port, free too: the default (52365) may be held by another cluster on the machine.
            "dashboard_agent_listen_port": _free_port(),
            # Notice a dead node in ~1.5 s instead of ~15 s, so the kill test stays short.
            "_system_config": {
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 3,
                "health_check_timeout_ms": 500,
            },
        },
    )
    try:
        workers = [cluster.add_node(num_cpus=2, resources={"tailrace_executor": 2}) for _ in range(2)]
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        yield Env(cluster, f"http://127.0.0.1:{port}", workers)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if session_was_up:
            start_session_ray()


def endpoints(sim) -> SimulatorEndpoints:
    return SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)


def demo_records(n: int, prefix: str = "r") -> list[dict]:
    records = [r for _, r in load_inputs(EXAMPLE / "inputs.jsonl")]
    return [{**records[i % len(records)], "id": f"{prefix}{i}"} for i in range(n)]


def batch_dir(tmp_path: Path, n: int) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE / "workflow.yaml", tmp_path / "workflow.yaml")
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_records(n)))
    return tmp_path


def finished(sid: str, address: str) -> str:
    """Wait for a job; on anything but success, fail with the end of its logs."""
    final = jobs.wait(sid, address, timeout_s=120)
    assert final == "SUCCEEDED", (jobs.status(sid, address).message, next(jobs.logs(sid, address))[-3000:])
    return final


def result_ids(path: Path) -> list[str]:
    return [json.loads(line)["run_id"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_job_stopped_mid_batch_resumes_then_a_resubmission_runs_nothing_twice(env, tmp_path, capsys):
    """One batch through every job step a user takes: submit, stop it mid-way, submit it again (it resumes
    where it stopped), status, results (directly and through a helper job), and a third submission (it
    skips every run)."""
    n = 16
    d = batch_dir(tmp_path / "batch", n)
    results_dir = str(tmp_path / "jobs")
    common = ["--address", env.address]
    submit = [
        "submit",
        str(d / "workflow.yaml"),
        "--inputs",
        str(d / "inputs.jsonl"),
        *common,
        "--python",
        sys.executable,
        "--results-dir",
        results_dir,
        "--scenario",
        "clean",
        "--time-scale",
        "0.3",
        "--deadline",
        "20",
        "--concurrency",
        "3",
        "--min-executors",
        "1",
        "--max-executors",
        "2",
        "--executor-resource",
        "tailrace_executor=1",
    ]
    assert main(submit) == 0
    out = capsys.readouterr().out
    match = re.search(r"(tailrace-support-triage-[0-9a-f]{12}): submitted", out)
    assert match, out
    sid = match.group(1)
    results = Path(results_dir) / sid / "results.jsonl"
    deadline = time.monotonic() + 90
    while len(result_ids(results)) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert main(["stop", sid, *common]) == 0
    assert jobs.wait(sid, env.address, timeout_s=60) == "STOPPED"
    capsys.readouterr()
    assert main(["status", sid, *common]) == 0  # stopped by its user: not a failure
    assert f"{sid}: STOPPED" in capsys.readouterr().out
    done_before = len(result_ids(results))
    assert 4 <= done_before < n

    # The same command again resumes the batch under the same submission id.
    assert main([*submit, "--wait"]) == 0
    assert f"{sid}: submitted again" in capsys.readouterr().out
    ids = result_ids(results)
    assert len(ids) == n and len(set(ids)) == n
    assert f"{done_before} already finished (skipped)" in next(jobs.logs(sid, env.address))

    assert main(["status", sid, *common, "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["status"] == "SUCCEEDED" and state["summary"]["runs"] == n
    assert state["summary"]["this_job"] == n - done_before
    assert state["progress"].startswith(f"{n}/{n} runs finished")

    local = tmp_path / "local.jsonl"
    assert main(["results", sid, *common, "--results-dir", results_dir, "--out", str(local)]) == 0
    assert f"{n} │" in capsys.readouterr().out and sorted(result_ids(local)) == sorted(f"r{i}" for i in range(n))
    assert (tmp_path / "local.trace.jsonl").is_file()
    # Through a helper job, as from a machine that cannot see the head node's disk: the same bytes.
    fetched = jobs.fetch_results(
        sid,
        tmp_path / "fetched.jsonl",
        address=env.address,
        results_dir=results_dir,
        python=sys.executable,
        via_job=True,
    )
    assert fetched.read_bytes() == local.read_bytes()

    # A third time, from Python: the same submission, and nothing is run twice.
    again = jobs.submit(
        d / "workflow.yaml",
        d / "inputs.jsonl",
        address=env.address,
        python=sys.executable,
        results_dir=results_dir,
        args=jobs.BatchArgs(
            "",
            "",
            {**DEMO.defaults.model_dump(), "deadline_s": 20.0},
            concurrency=3,
            scenario="clean",
            time_scale=0.3,
            pool={"min_executors": 1, "max_executors": 2, "executor_resources": ON_WORKERS},
        ),
    )
    assert (again.submission_id, again.job_id, again.action) == (sid, f"{sid}.3", "resubmitted")
    finished(sid, env.address)
    assert f"{n} already finished (skipped)" in next(jobs.logs(sid, env.address))
    assert len(result_ids(results)) == n
    assert jobs.status(sid, env.address).summary["this_job"] == 0


def test_token_auth_is_on_and_the_client_carries_the_token(env):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{env.address}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(f"{env.address}/api/jobs/", headers=jobs.auth_headers())
    with urllib.request.urlopen(request, timeout=10) as ok:
        assert ok.status == 200


def test_runs_spread_over_both_worker_nodes(env, simulator):
    sim = simulator("clean", seed=3, time_scale=0.05)
    pools: list[ExecutorPool] = []
    summary = run_batch(
        DEMO,
        demo_records(16),
        options=RunOptions(deadline_s=20),
        simulator=endpoints(sim),
        pool=PoolConfig.fixed(2, executor_resources=ON_WORKERS),
        on_pool=pools.append,
    )
    assert summary.delivered == 16
    served = pools[0].status().served
    assert set(served) == env.worker_ids(), "executors were not spread over the two worker nodes"
    assert all(n >= 10 for n in served.values()), served


def test_killing_a_worker_node_mid_batch_every_run_ends_by_its_deadline(env, simulator, tmp_path):
    sim = simulator("clean", seed=6, time_scale=0.3)
    pools: list[ExecutorPool] = []
    victim = env.workers[1]
    outcomes = []
    deadline_s, grace_s = 12.0, 0.25

    def journal_knows(steps: int) -> bool:
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("tailrace-attempt-journal-"):
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                if ray.get(handle.stats.remote(), timeout=5)["steps"] >= steps:
                    return True
        return False

    def kill_when_busy() -> None:
        while not pools or pools[0].status().steps_in_flight < 4:
            time.sleep(0.05)
        end = time.monotonic() + 20  # the attempts in flight are reported (every 0.1 s; later under load)
        while not journal_knows(4) and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.5)
        env.cluster.remove_node(victim, allow_graceful=False)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    started = time.monotonic()
    out = tmp_path / "results.jsonl"
    summary = run_batch(
        DEMO,
        demo_records(12, "k"),
        options=RunOptions(deadline_s=deadline_s),
        out=out,
        simulator=endpoints(sim),
        max_in_flight=12,
        grace_s=grace_s,
        pool=PoolConfig(
            min_executors=2, max_executors=2, executor_resources=ON_WORKERS, replace_after_s=2.0, scale_interval_s=0.2
        ),
        on_pool=pools.append,
        on_done=outcomes.append,
    )
    killer.join(timeout=30)
    env.workers[1] = env.cluster.add_node(num_cpus=2, resources={"tailrace_executor": 2})  # for later tests
    assert summary.runs == 12 and len(outcomes) == 12
    assert time.monotonic() - started < deadline_s + 10, "the batch hung"
    for o in outcomes:
        assert o.delivered or o.failure in set(FailureReason), o
        assert o.ended_at <= o.deadline_at + grace_s + 1.0, f"{o.run_id} outlived its deadline"
    kinds = [e.kind for e in pools[0].events]
    assert "dead" in kinds and "replace" in kinds, kinds
    # Steps in flight on the dead node were re-dispatched within their deadline.
    assert summary.delivered >= 10, summary.failures
    # The attempts that were running there are recorded (issue 13 item 3), each run written exactly once.
    written = result_ids(out)
    assert sorted(written) == sorted(f"k{i}" for i in range(12)), written
    lost = [a for o in outcomes for a in o.attempts if a.cancel_reason == CancelReason.EXECUTOR_LOST]
    assert lost, "no attempt was recorded as lost with the node"
    assert all(a.cost_usd > 0 and not a.usage_reported for a in lost)
    for o in outcomes:
        keys = [(a.step_id, a.attempt) for a in o.attempts]
        assert len(keys) == len(set(keys)), f"{o.run_id}: attempt numbers repeat"


def test_pending_executors_are_placed_on_a_node_added_for_them(env, simulator):
    """The autoscaler's view: executors ask for a resource no node has room for; they wait as demand
    (and the pool sends `request_resources`); a node that offers it joins and they start there."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.sdk import get_cluster_resource_state
    from ray.experimental.internal_kv import _internal_kv_get

    small = env.cluster.add_node(num_cpus=1, resources={"tailrace_burst": 1})
    sim = simulator("clean", seed=7, time_scale=2.0)  # runs of ~10 s: the load outlasts adding a node
    config = PoolConfig(
        min_executors=1,
        max_executors=3,
        target_in_flight=2,
        executor_num_cpus=0,
        executor_resources={"tailrace_burst": 1},
        scale_interval_s=0.2,
        scale_down_after_s=1.5,
    )
    added: list[Any] = []

    def hinted() -> list[dict]:
        return json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")

    async def scenario() -> tuple[BatchSummary, ExecutorPool, dict[str, Any]]:
        seen: dict[str, Any] = {}
        summary = BatchSummary()
        async with ExecutorPool(resolve_providers(DEMO, endpoints(sim)), config) as pool:
            driver = WorkflowDriver(DEMO, RunOptions(deadline_s=60), pool)
            batch = asyncio.ensure_future(
                run_records(
                    driver, [(r["id"], r) for r in demo_records(12, "a")], ResultWriter(None), summary, max_in_flight=12
                )
            )
            for _ in range(300):
                if pool.status().starting == 2:
                    break
                await asyncio.sleep(0.05)
            seen["pending"] = pool.status().starting
            seen["hint"] = hinted()
            for _ in range(100):  # raylets report their waiting work about every second
                state = get_cluster_resource_state(ray._private.worker.global_worker.gcs_client)
                seen["demand"] = [
                    dict(r.request.resources_bundle) for r in state.pending_resource_requests for _ in range(r.count)
                ]
                if len(seen["demand"]) >= 2:
                    break
                await asyncio.sleep(0.1)
            need_node.set()  # the test, playing the autoscaler, adds a node
            await asyncio.to_thread(node_added.wait, 60)
            for _ in range(300):
                if pool.status().ready == 3:
                    break
                await asyncio.sleep(0.05)
            seen["nodes"] = dict(pool.status().nodes)
            await batch
            for _ in range(200):
                if pool.status().ready + pool.status().starting == 1:
                    break
                await asyncio.sleep(0.05)
            seen["idle"] = pool.status().ready + pool.status().starting
            seen["idle_hint"] = hinted()
        return summary, pool, seen

    need_node, node_added = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def in_background() -> None:  # nodes are added from the main thread (Ray installs signal handlers)
        try:
            outcome["result"] = asyncio.run(scenario())
        except BaseException as exc:
            outcome["error"] = exc
            need_node.set()

    worker = threading.Thread(target=in_background, daemon=True)
    worker.start()
    try:
        assert need_node.wait(60), "the pool never asked for more executors than fit"
        if "error" not in outcome:
            added.append(env.cluster.add_node(num_cpus=1, resources={"tailrace_burst": 2}))
        node_added.set()
        worker.join(120)
    finally:
        node_added.set()
        for node in [small, *added]:
            env.cluster.remove_node(node)
    if "error" in outcome:
        raise outcome["error"]
    summary, _, seen = outcome["result"]
    assert seen["pending"] == 2
    assert seen["hint"] == [{"tailrace_burst": 1}] * 3  # what the autoscaler is asked for
    assert seen["demand"].count({"tailrace_burst": 1.0}) >= 2  # what it sees waiting
    assert sorted(seen["nodes"].values()) == [1, 2], seen["nodes"]  # the new node took the two pending ones
    assert summary.delivered == 12
    assert seen["idle"] == 1 and seen["idle_hint"] == [{"tailrace_burst": 1}]


def test_driver_deadline_cancels_attempts_running_on_another_node(env, simulator):
    """Executors on the worker nodes believe they have 30 s more (their wall clocks lag); the driver's
    backstop still ends every run on time and the attempts there are cancelled (reason: the deadline)
    and settled."""
    sim = simulator("clean", seed=1, time_scale=0.05, force_fault=HANG_ALL)
    outcomes = []
    run_batch(
        DEMO,
        demo_records(4, "d"),
        options=RunOptions(deadline_s=2.0),
        simulator=endpoints(sim),
        grace_s=0.5,
        executor_clock=SkewedClock(-30.0),
        on_done=outcomes.append,
        pool=PoolConfig.fixed(2, executor_resources=ON_WORKERS),
    )
    assert len(outcomes) == 4
    for o in outcomes:
        assert o.failure == FailureReason.DEADLINE_EXCEEDED
        assert o.ended_at - o.deadline_at < 1.0, f"{o.run_id} outlived its deadline"
        assert all(a.cancel_reason == CancelReason.DEADLINE for a in o.attempts)
    assert sum(len(o.attempts) for o in outcomes) >= 1
    end = time.monotonic() + 5
    while not all(r["cancelled"] for r in sim.log_records()) and time.monotonic() < end:
        time.sleep(0.05)
    log = sim.log_records()
    assert log and all(r["cancelled"] for r in log), "hung requests were left open on the worker nodes"


# ---- user code on executors of other nodes ------------------------------------------------------------

CHECKS = '''
"""A user's checks, kept next to their workflow."""
import ray
from pydantic import BaseModel


class Triage(BaseModel):
    ticket_id: str
    priority: int


def ticket_ok(value, text, inputs):
    if inputs["ticket_id"].endswith("BAD"):
        return "flagged by the user's check on node " + ray.get_runtime_context().get_node_id()
    return None
'''

TRIAGE = """
name: user-code
inputs: [ticket_id]
steps:
  - id: triage
    prompt: "Triage ticket {{input.ticket_id}}."
    models:
      - {provider: openai, model: gpt-4o-mini, max_tokens: 200}
      - {provider: anthropic, model: claude-haiku-4-5, max_tokens: 200}
    output:
      kind: json
      schema_model: "%(module)s:Triage"
      copy_ids: [ticket_id]
      validators: ["%(module)s:ticket_ok"]
"""


def user_checks(directory: Path, module: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(CHECKS)
    (directory / "workflow.yaml").write_text(TRIAGE % {"module": module})
    tickets = [{"id": "good", "ticket_id": "T-1"}, {"id": "bad", "ticket_id": "T-2-BAD"}]
    (directory / "inputs.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tickets))
    return directory


def test_user_code_shipped_with_the_executors_is_applied_on_worker_nodes(env, simulator, tmp_path, monkeypatch):
    import importlib

    from tailrace import BatchConfig

    d = user_checks(tmp_path / "mine", "node_checks")
    monkeypatch.syspath_prepend(str(d))  # the driver imports it; the worker nodes get it shipped
    module = importlib.import_module("node_checks")
    sim = simulator("clean", seed=2, time_scale=0.01, script={"gpt-4o-mini": [Fault.SCHEMA_MISS]})
    outcomes = []
    run_batch(
        load_workflow(d / "workflow.yaml"),
        d / "inputs.jsonl",
        options=RunOptions(deadline_s=20),
        config=BatchConfig(
            pool=PoolConfig.fixed(2, executor_resources=ON_WORKERS), max_in_flight=1, user_modules=[module]
        ),
        providers=endpoints(sim),
        on_done=outcomes.append,
    )
    good, bad = sorted(outcomes, key=lambda o: o.run_id != "good")
    assert good.delivered and good.outputs["triage"]["ticket_id"] == "T-1"
    assert good.attempts[0].invalid_reason.startswith("schema: ")  # the user's model rejected the bad answer
    assert bad.failure == FailureReason.INVALID_OUTPUT
    nodes = {a.invalid_reason.rsplit(" ", 1)[1] for a in bad.attempts if a.invalid_reason}
    assert nodes and nodes <= env.worker_ids(), "the user's validator did not run on the worker nodes"
    sys.modules.pop("node_checks", None)


def test_user_code_next_to_the_workflow_travels_with_a_job(env, tmp_path, capsys):
    d = user_checks(tmp_path / "batch", "job_checks")
    results_dir = tmp_path / "jobs"
    code = main(
        [
            "submit",
            str(d / "workflow.yaml"),
            "--inputs",
            str(d / "inputs.jsonl"),
            "--address",
            env.address,
            "--results-dir",
            str(results_dir),
            "--scenario",
            "clean",
            "--time-scale",
            "0.01",
            "--min-executors",
            "2",
            "--max-executors",
            "2",
            "--executor-resource",
            "tailrace_executor=1",
            "--wait",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    sid = re.search(r"(tailrace-user-code-[0-9a-f]{12}): submitted", out).group(1)
    assert f"--address {env.address}" in out  # the hints work as printed
    results = {o["run_id"]: o for o in map(json.loads, (results_dir / sid / "results.jsonl").read_text().splitlines())}
    assert results["good"]["delivered"] and results["good"]["outputs"]["triage"]["ticket_id"] == "T-1"
    reasons = [a["invalid_reason"] for a in results["bad"]["attempts"] if a["invalid_reason"]]
    assert reasons and all(r.startswith("validator:job_checks:ticket_ok: flagged") for r in reasons)
    assert {r.rsplit(" ", 1)[1] for r in reasons} <= env.worker_ids()
