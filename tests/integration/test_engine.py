"""The online engine on the suite's Ray cluster: started once, single runs on request (many at once),
spread over its executors, each with its own deadline."""

from __future__ import annotations

import asyncio

import pytest
import ray

from tailrace import Engine, EngineConfig, PoolConfig, RunOptions
from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import CancelReason, FailureReason
from tailrace.engine.sim import Fault

pytestmark = pytest.mark.usefixtures("ray_cluster")

ONE_STEP = workflow_from_dict(
    {
        "name": "one-step",
        "inputs": ["ticket_id"],
        "steps": [
            {
                "id": "summary",
                "prompt": "Summarise ticket {{input.ticket_id}} in one line.",
                "models": [{"provider": "openai", "model": "gpt-4o-mini", "max_tokens": 100}],
            }
        ],
        "defaults": {"deadline_s": 20},
    }
)


def endpoints(sim) -> SimulatorEndpoints:
    return SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)


async def test_runs_one_at_a_time_are_spread_over_three_executors(start_sim):
    sim = await start_sim("clean", seed=2, time_scale=0.001)
    config = EngineConfig(pool=PoolConfig.fixed(3))
    async with Engine(config, workflows=[ONE_STEP], providers=endpoints(sim)) as engine:
        for i in range(9):
            outcome = await engine.run(ONE_STEP, {"ticket_id": f"T-{i}"})
            assert outcome.delivered, outcome.detail
        served = [info["served"] for info in await asyncio.gather(*(h.health.remote() for h in engine.pool.handles()))]
    # One step at a time, so every executor is idle at each choice: ties go round in turn.
    assert sorted(served) == [3, 3, 3], served


async def test_many_runs_at_once_each_with_its_own_deadline(start_sim):
    sim = await start_sim("clean", seed=3, time_scale=0.001, force_fault={"gpt-4.1": Fault.HANG})
    hangs = workflow_from_dict(
        {**ONE_STEP.model_dump(), "name": "hangs", "steps": [
            {**ONE_STEP.steps[0].model_dump(), "models": [{"provider": "openai", "model": "gpt-4.1", "max_tokens": 50}]}
        ]}
    )  # fmt: skip
    async with Engine(workflows=[ONE_STEP, hangs], providers=endpoints(sim)) as engine:
        quick = [engine.run(ONE_STEP, {"ticket_id": f"T-{i}"}, run_id=f"q{i}") for i in range(40)]
        hung = engine.run(hangs, {"ticket_id": "T-h"}, deadline=0.6, run_id="h")
        *delivered, late = await asyncio.gather(*quick, hung)
    assert all(o.delivered for o in delivered) and {o.run_id for o in delivered} == {f"q{i}" for i in range(40)}
    assert late.failure == FailureReason.DEADLINE_EXCEEDED
    assert late.deadline_at - late.started_at == pytest.approx(0.6, abs=0.05)
    assert late.ended_at <= late.deadline_at + 0.25  # within the default grace
    assert all(a.cancel_reason == CancelReason.DEADLINE for a in late.attempts)


async def test_run_options_per_request_and_missing_inputs(start_sim):
    sim = await start_sim("clean", seed=4, time_scale=0.001)
    async with Engine(workflows=[ONE_STEP], providers=endpoints(sim)) as engine:
        outcome = await engine.run(ONE_STEP, {"ticket_id": "T-1"}, options=RunOptions(deadline_s=5, tenant="gold"))
        assert outcome.delivered and outcome.tenant == "gold"
        assert outcome.deadline_at - outcome.started_at == pytest.approx(5.0)
        with pytest.raises(Exception, match="missing input field"):
            await engine.run(ONE_STEP, {"ticket": "T-1"}, run_id="r1")


async def test_an_engine_kills_what_it_started_when_it_closes(start_sim):
    sim = await start_sim("clean", seed=5, time_scale=0.001)
    engine = await Engine(workflows=[ONE_STEP], providers=endpoints(sim)).start()
    handles = engine.pool.handles()
    await engine.close()
    await asyncio.sleep(0.5)
    with pytest.raises(ray.exceptions.RayActorError):
        await asyncio.wait_for(handles[0].health.remote(), 10)
