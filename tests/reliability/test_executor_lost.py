"""An executor killed with attempts in flight: its attempts are recorded (cancelled, `executor_lost`, settled
as their reservation), its steps run again elsewhere, and spend and traces agree with what the provider saw."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from run_checks import assert_each_run_once, assert_each_run_typed_and_on_time, wait_until_the_journal_knows

from tailrace.cluster.api import run_batch
from tailrace.cluster.pool import ExecutorPool, PoolConfig
from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.cluster.trace import read_trace
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import AttemptOutcome, CancelReason
from tailrace.engine.sim import Fault
from tailrace.engine.specs import HedgeConfig, RunOptions

pytestmark = pytest.mark.usefixtures("ray_cluster")

PRICE = {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 8.0}
ONE_STEP = workflow_from_dict(
    {
        "name": "lost",
        "inputs": ["ticket"],
        "steps": [
            {
                "id": "answer",
                "prompt": "Answer ticket {{input.ticket}}.",
                "models": [{"provider": "openai", "model": "gpt-4.1", "max_tokens": 300, **PRICE}],
            }
        ],
    }
)


def test_attempts_on_a_killed_executor_are_recorded_and_their_steps_run_elsewhere(simulator, tmp_path):
    # The first request of each run is a straggler (~13 s): an executor is killed under them whatever the
    # machine's load; the steps it ran go to the other executor, where their requests are quick (~0.7 s).
    runs = 6
    sim = simulator(
        "clean",
        seed=11,
        time_scale=0.3,
        straggler_factor=(20.0, 20.0),
        script={"gpt-4.1": [Fault.STRAGGLER] * runs},
    )
    pools: list[ExecutorPool] = []
    outcomes = []
    killed: list[str] = []
    deadline_s, grace_s = 25.0, 0.5

    def kill_one_with_attempts_in_flight() -> None:
        end = time.monotonic() + 60
        while (not pools or len(sim.log_records()) + _open_requests(sim) < runs) and time.monotonic() < end:
            time.sleep(0.02)
        wait_until_the_journal_knows(runs, within_s=20)  # every step's attempt is reported
        handles = pools[0].handles()
        if handles:
            killed.append(str(handles[0]))
            ray.kill(handles[0], no_restart=True)

    killer = threading.Thread(target=kill_one_with_attempts_in_flight, daemon=True)
    killer.start()
    out = tmp_path / "results.jsonl"
    summary = run_batch(
        ONE_STEP,
        [{"id": f"k{i}", "ticket": f"T-{i}"} for i in range(runs)],
        options=RunOptions(deadline_s=deadline_s),
        out=out,
        simulator=SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url),
        max_in_flight=runs,
        grace_s=grace_s,
        # One attempt per step (no duplicates, and no attempt timeout on the stragglers before the kill):
        # every attempt start is a dispatch.
        hedge=HedgeConfig(enabled=False, timeout_factor=100),
        pool=PoolConfig(min_executors=2, max_executors=2, scale_interval_s=0.2),
        on_pool=pools.append,
        on_done=outcomes.append,
    )
    killer.join(timeout=60)
    assert killed, "the executor was never killed"

    assert_each_run_typed_and_on_time(outcomes, grace_s)
    lines = assert_each_run_once(out, runs)
    lost = [a for o in outcomes for a in o.attempts if a.cancel_reason == CancelReason.EXECUTOR_LOST]
    assert lost, "no attempt was recorded as lost with its executor"
    for a in lost:
        assert a.outcome == AttemptOutcome.CANCELLED and not a.usage_reported
        # Settled as the whole reservation: the prompt estimate and max_tokens, at the model's prices.
        assert a.output_tokens == 300 and a.input_tokens > 0
        assert a.cost_usd == pytest.approx((a.input_tokens * 2.0 + 300 * 8.0) / 1e6)
    # The lost steps ran again on the other executor and delivered, within their deadline.
    assert summary.delivered == runs, summary.failures
    for o in outcomes:
        numbers = [a.attempt for a in o.attempts]
        assert len(numbers) == len(set(numbers)), f"{o.run_id}: attempt numbers repeat: {numbers}"
        assert o.cost_usd == pytest.approx(sum(a.cost_usd for a in o.attempts))

    # Every request the provider saw is an attempt in the results and in the trace, and costs agree.
    seen_by_provider = len(sim.log_records()) + _open_requests(sim)
    recorded = sum(len(line["attempts"]) for line in lines)
    assert recorded == seen_by_provider == runs + len(lost)
    traced = [t for t in read_trace(tmp_path / "results.trace.jsonl") if t["kind"] == "attempt"]
    assert len(traced) == recorded
    assert sum(t["cost_usd"] for t in traced) == pytest.approx(sum(o.cost_usd for o in outcomes))
    assert sum(1 for t in traced if t["why_lost"] == "executor_lost") == len(lost)


def _open_requests(sim) -> int:
    """Requests the simulator is still serving (its log has a line per finished request)."""
    return int(sim.stats()["in_flight"])
