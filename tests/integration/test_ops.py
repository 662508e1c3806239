"""Operations on the session cluster: the executor pool scaling, a skewed executor clock, and the
dashboard series read back from the node's Prometheus endpoint. (Multi-node cases: tests/multinode.)"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from tailrace.cluster.api import run_batch
from tailrace.cluster.driver import WorkflowDriver, run_records
from tailrace.cluster.pool import ExecutorPool, PoolConfig
from tailrace.cluster.providers import SimulatorEndpoints, resolve_providers
from tailrace.cluster.results import BatchSummary, ResultWriter
from tailrace.engine.clock import SkewedClock
from tailrace.engine.loading import load_inputs, load_workflow, workflow_from_dict
from tailrace.engine.outcomes import FailureReason
from tailrace.engine.sim import Fault
from tailrace.engine.specs import RunOptions

pytestmark = pytest.mark.usefixtures("ray_cluster")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support_triage"
DEMO = load_workflow(EXAMPLE / "workflow.yaml")
HANG_ALL = {m: Fault.HANG for m in ("gpt-4.1", "claude-haiku-4-5", "gpt-4o-mini")}


def endpoints(sim) -> SimulatorEndpoints:
    return SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)


def demo_records(n: int, prefix: str = "r") -> list[dict]:
    records = [r for _, r in load_inputs(EXAMPLE / "inputs.jsonl")]
    return [{**records[i % len(records)], "id": f"{prefix}{i}"} for i in range(n)]


def test_pool_grows_under_backlog_and_shrinks_when_idle(simulator):
    sim = simulator("clean", seed=2, time_scale=1.0)  # runs of ~5 s: a real backlog builds
    config = PoolConfig(
        min_executors=1,
        max_executors=3,
        target_in_flight=3,
        executor_num_cpus=0.1,
        scale_interval_s=0.2,
        scale_down_after_s=0.6,
        request_resources=False,
    )

    async def scenario() -> tuple[list[int], BatchSummary, int, ExecutorPool]:
        summary = BatchSummary()
        sizes = []
        async with ExecutorPool(resolve_providers(DEMO, endpoints(sim)), config) as pool:
            assert pool.status().ready == 1
            driver = WorkflowDriver(DEMO, RunOptions(deadline_s=30), pool)
            batch = asyncio.ensure_future(
                run_records(
                    driver, [(r["id"], r) for r in demo_records(12)], ResultWriter(None), summary, max_in_flight=12
                )
            )
            while not batch.done():
                sizes.append(pool.status().ready)
                await asyncio.sleep(0.1)
            await batch
            for _ in range(100):  # idle now: it must come back to the minimum
                if pool.status().ready + pool.status().starting == 1:
                    break
                await asyncio.sleep(0.1)
            return sizes, summary, pool.status().ready + pool.status().starting, pool

    sizes, summary, idle_size, pool = asyncio.run(scenario())
    assert summary.delivered == 12
    # The pool's decisions, from its events: sampling `ready` raced the executors' start-up, which on a busy
    # machine took longer than the backlog lasted (the third came up 0.2 s before the idle shrink).
    events = list(pool.events)
    grown = [e.size for e in events if e.kind == "grow"]
    assert max(grown) == 3, f"the pool never grew to its maximum: {sizes} {events}"
    kinds = [e.kind for e in events]
    assert kinds.count("ready") >= 3, f"an executor it grew never came up: {events}"
    assert max(sizes) >= 2, f"no executor it grew served the backlog: {sizes} {events}"
    assert idle_size == 1
    assert kinds.count("grow") >= 3 and "shrink" in kinds


def test_executor_clock_ahead_ends_steps_early_by_the_skew(simulator, tmp_path):
    sim = simulator("clean", seed=1, time_scale=0.05, force_fault=HANG_ALL)
    outcomes = []
    run_batch(
        DEMO,
        demo_records(2),
        options=RunOptions(deadline_s=4.0),
        simulator=endpoints(sim),
        executor_clock=SkewedClock(+2.5),
        on_done=outcomes.append,
        out=tmp_path / "r.jsonl",
    )
    for o in outcomes:
        assert o.failure == FailureReason.DEADLINE_EXCEEDED and o.failed_step == "classify"
        # The executor's wall clock runs 2.5 s ahead: it saw the 4 s deadline 2.5 s early.
        assert 1.3 < o.latency_s < 2.6, o.latency_s


PROBE = workflow_from_dict(
    {
        "name": "metrics_probe",
        "inputs": ["ticket_id"],
        "steps": [
            {
                "id": "note",
                "prompt": "Note on {{input.ticket_id}}.",
                "output": {"copy_ids": ["ticket_id"]},
                "models": [
                    {
                        "provider": "openai",
                        "model": "gpt-4o-mini",
                        "max_tokens": 200,
                        "input_usd_per_mtok": 0.15,
                        "output_usd_per_mtok": 0.6,
                    }
                ],
            }
        ],
    }
)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _total(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_dashboard_series_are_readable_from_the_prometheus_endpoint(simulator):
    # A 429 (billed nothing) then an empty answer (its prompt is billed: wasted tokens) on the first model.
    sim = simulator("clean", seed=4, time_scale=0.02, script={"gpt-4o-mini": [Fault.RATE_LIMITED, Fault.EMPTY]})
    summary = run_batch(
        PROBE, [{"ticket_id": f"T-{i}"} for i in range(6)], options=RunOptions(deadline_s=10), simulator=endpoints(sim)
    )
    assert summary.delivered == 6
    port = ray._private.worker._global_node.metrics_export_port
    wanted = {
        "ray_tailrace_runs_total": {"workflow": "metrics_probe", "outcome": "delivered"},
        "ray_tailrace_attempts_total": {"model": "gpt-4o-mini", "outcome": "valid"},
        "ray_tailrace_provider_429_total": {"model": "gpt-4o-mini"},
        "ray_tailrace_cost_usd_total": {"workflow": "metrics_probe"},
        "ray_tailrace_tokens_total": {"model": "gpt-4o-mini", "kind": "output"},
        "ray_tailrace_run_latency_seconds_count": {"workflow": "metrics_probe"},
        "ray_tailrace_step_latency_seconds_count": {"workflow": "metrics_probe", "step": "note"},
        "ray_tailrace_tokens_wasted_total": {"model": "gpt-4o-mini"},
    }
    deadline = time.monotonic() + 60  # the metrics agent exports every 2 s here (tests/conftest.py)
    text = ""
    while time.monotonic() < deadline:
        text = _scrape(port)
        if all(_total(text, name, **labels) > 0 for name, labels in wanted.items()):
            break
        time.sleep(0.5)
    missing = [name for name, labels in wanted.items() if _total(text, name, **labels) <= 0]
    assert not missing, f"series not exported: {missing}"
    assert _total(text, "ray_tailrace_runs_total", workflow="metrics_probe", outcome="delivered") == 6
    assert _total(text, "ray_tailrace_provider_429_total", model="gpt-4o-mini") == 1
    assert _total(text, "ray_tailrace_step_latency_seconds_count", workflow="metrics_probe") == 6
    assert re.search(r'^ray_tailrace_pool_executors\{.*state="ready"', text, re.MULTILINE)
