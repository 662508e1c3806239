"""The step runner without Ray: real adapters, real HTTP, the simulator in a thread."""

from __future__ import annotations

import asyncio
import time

import pytest

from tailrace.engine.clock import SYSTEM_CLOCK, RunDeadline
from tailrace.engine.outcomes import AttemptOutcome, CancelReason, FailureReason
from tailrace.engine.providers.base import AdapterSettings, build_adapter
from tailrace.engine.sim import Fault
from tailrace.engine.specs import StepSpec
from tailrace.runtime.step_runner import RunStop, StepRequest, StepRunner


def step(**overrides) -> StepSpec:
    fields = {
        "id": "note",
        "prompt": "Write a note about {{input.ticket_id}}.",
        "models": [
            {
                "provider": "openai",
                "model": "gpt-4o-mini",
                "max_tokens": 200,
                "input_usd_per_mtok": 0.15,
                "output_usd_per_mtok": 0.6,
            }
        ],
        "output": {"copy_ids": ["ticket_id"]},
    }
    return StepSpec.model_validate({**fields, **overrides})


def request(spec: StepSpec, deadline_s: float = 5.0, **overrides) -> StepRequest:
    return StepRequest(
        run_id="run-1",
        workflow="w",
        tenant="t",
        step=spec,
        inputs={"ticket_id": "TCK-7"},
        upstream={},
        deadline=RunDeadline(SYSTEM_CLOCK.time() + deadline_s),
        **overrides,
    )


def runner(sim) -> StepRunner:
    settings = AdapterSettings(kind="openai", base_url=sim.openai_base_url, api_key="sk-test")
    return StepRunner({"openai": build_adapter(settings, SYSTEM_CLOCK)})


async def test_valid_answer_is_delivered_with_its_usage(simulator):
    sim = simulator("clean", seed=2, time_scale=0.02)
    result = await runner(sim).run(request(step()))
    assert result.ok and "TCK-7" in result.output
    [attempt] = result.attempts
    assert attempt.outcome == AttemptOutcome.VALID and attempt.usage_reported
    assert attempt.cost_usd == pytest.approx((attempt.input_tokens * 0.15 + attempt.output_tokens * 0.6) / 1e6)
    assert attempt.ttft_s is not None and 0 <= attempt.ttft_s <= attempt.latency_s


async def test_deadline_cancels_a_hung_attempt_and_closes_its_stream(simulator):
    sim = simulator("clean", seed=2, time_scale=0.02, force_fault={"gpt-4o-mini": Fault.HANG})
    started = time.monotonic()
    result = await runner(sim).run(request(step(), deadline_s=0.5))
    assert time.monotonic() - started < 1.5
    assert result.failure == FailureReason.DEADLINE_EXCEEDED
    assert [a.cancel_reason for a in result.attempts] == [CancelReason.DEADLINE]
    await asyncio.sleep(0.2)  # the simulator logs the disconnect when it notices it
    assert [r["cancelled"] for r in sim.log_records()] == [True]


async def test_stop_signal_cancels_the_step(simulator):
    sim = simulator("clean", seed=2, time_scale=0.02, force_fault={"gpt-4o-mini": Fault.HANG})
    stop = RunStop()
    task = asyncio.create_task(runner(sim).run(request(step()), stop))
    await asyncio.sleep(0.3)
    stop.set()
    result = await asyncio.wait_for(task, 2)
    assert result.failure == FailureReason.CANCELLED
    assert [a.cancel_reason for a in result.attempts] == [CancelReason.RUN_FAILED]


async def test_cost_cap_refuses_before_anything_is_sent(simulator):
    sim = simulator("clean", seed=2, time_scale=0.02)
    result = await runner(sim).run(request(step(), cost_remaining_usd=1e-9))
    assert result.failure == FailureReason.BUDGET_EXHAUSTED and result.attempts == []
    assert sim.log_records() == []


async def test_side_effect_retries_carry_one_stable_idempotency_key(simulator):
    sim = simulator("clean", seed=2, time_scale=0.02, script={"gpt-4o-mini": [Fault.HTTP_500]})
    result = await runner(sim).run(request(step(side_effect=True)))
    assert result.ok
    keys = [r["idempotency_key"] for r in sim.log_records()]
    assert len(keys) == 2 and keys[0] == keys[1] == "tailrace-run-1-note"
    assert [a.idempotency_key for a in result.attempts] == keys
