"""The driver's budget admission on fake time (no Ray): refuses at submission what cannot make its deadline,
learns what a run really costs and how long it really takes."""

from __future__ import annotations

import asyncio

import pytest

from tailrace.cluster.budget import BudgetAdmission
from tailrace.engine.clock import FakeClock, RunDeadline
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, FailureReason, RunOutcome
from tailrace.policies.budget_config import BudgetConfig, LimitSpec

WORKFLOW = workflow_from_dict(
    {
        "name": "w",
        "inputs": ["x"],
        "steps": [
            {
                "id": "a",
                "prompt": "Do {{input.x}}.",
                "models": [{"provider": "openai", "model": "m", "max_tokens": 100, "expected_latency_s": 1.0}],
            },
            {
                "id": "b",
                "depends_on": ["a"],
                "prompt": "Check {{steps.a}}.",
                "models": [{"provider": "openai", "model": "m", "max_tokens": 100, "expected_latency_s": 1.0}],
            },
        ],
    }
)
KEY = "tokens:openai:*"


def admission(clock: FakeClock, tpm: int = 6000) -> BudgetAdmission:
    config = BudgetConfig(limits=[LimitSpec(account="openai", tpm=tpm)], admission_margin=0.0).for_workflow(WORKFLOW)
    return BudgetAdmission(config, WORKFLOW, None, clock)


def outcome(clock: FakeClock, run_id: str, input_tokens: int, latency_s: float, on_time: bool = True) -> RunOutcome:
    now = clock.time()
    attempts = [
        AttemptRecord(
            run_id=run_id,
            step_id=s,
            attempt=0,
            provider="openai",
            model="m",
            started_at=now,
            ended_at=now + latency_s,
            latency_s=latency_s,
            input_tokens=input_tokens,
            output_tokens=20,
            usage_reported=True,
            outcome=AttemptOutcome.VALID,
        )
        for s in ("a", "b")
    ]
    return RunOutcome(
        run_id=run_id,
        workflow="w",
        tenant="t",
        delivered=on_time,
        failure=None if on_time else FailureReason.DEADLINE_EXCEEDED,
        started_at=now,
        ended_at=now + (2 * latency_s if on_time else 99),
        deadline_at=now + 30,
        latency_s=1,
        attempts=attempts if on_time else [],
    )


async def test_a_cold_workflow_is_refused_on_tokens_only_never_on_latency_priors():
    clock = FakeClock()
    adm = admission(clock)
    # Before any run delivered, a step is planned at what the provider takes at admission.
    need = adm.run_need()[KEY]
    assert 300 < need < 400  # two steps: max_tokens 100 + a guess of the rendered prompt
    assert adm.critical_path_s == 0.0  # nothing measured
    opts = WORKFLOW.defaults.model_copy(update={"tenant": "t"})
    # A deadline far below the priors' critical path (1.5 x 2 x 1.0 s) is no reason to refuse a cold run.
    assert await adm.admit("quick", WORKFLOW, opts, RunDeadline.start(0.5, clock)) is None
    admitted = 1
    while await adm.admit(f"r{admitted}", WORKFLOW, opts, RunDeadline.start(3.5, clock)) is None:
        admitted += 1
    # 6000 free now, 100/s until each step's latest start (at most half the run's time for its path).
    assert (6000 + 100 * 1.7) / need - 2 <= admitted <= (6000 + 100 * 3.5) / need + 1
    why = await adm.admit("late", WORKFLOW, opts, RunDeadline.start(3.5, clock))
    assert why.startswith("budget_exhausted at submission") and KEY in why
    assert "no run has delivered yet" in why


async def test_learns_the_real_need_and_gives_back_what_a_run_did_not_use():
    clock = FakeClock()
    adm = admission(clock)
    opts = WORKFLOW.defaults
    assert await adm.admit("r1", WORKFLOW, opts, RunDeadline.start(30, clock)) is None
    clock.advance(0.01)  # the plan serves r1's need from what is free
    before = adm._planner.free(KEY, clock.monotonic())
    adm.finished("r1", outcome(clock, "r1", input_tokens=10, latency_s=0.5))
    after = adm._planner.free(KEY, clock.monotonic())
    assert after > before  # charged 2 x (10 + 20), planned prompt + max_tokens: the rest comes back
    for i in range(30):
        adm.finished(f"x{i}", outcome(clock, f"x{i}", input_tokens=10, latency_s=0.5))
    # What runs use (prompt + output produced), not prompt + max_tokens: the provider corrects to use.
    assert adm.run_need()[KEY] == pytest.approx(2 * (10 + 20), rel=0.02)


async def test_the_critical_path_is_measured_on_finished_runs_and_late_runs_stretch_it():
    clock = FakeClock()
    adm = admission(clock)
    opts = WORKFLOW.defaults
    adm.finished("s0", outcome(clock, "s0", 10, latency_s=0.5))
    assert adm.critical_path_s == pytest.approx(1.1 * 2 * 0.5)  # two steps of 0.5 s, with a margin
    why = await adm.admit("tight", WORKFLOW, opts, RunDeadline.start(1.0, clock))
    assert why is not None and "take 1.10 s" in why and "measured on 1 finished runs" in why
    prior = adm.critical_path_s
    for i in range(3):
        adm.finished(f"l{i}", outcome(clock, f"l{i}", 10, 0.5, on_time=False))
    assert adm.critical_path_s == pytest.approx(prior * 1.25)  # late runs come in clumps: counted once a second
    clock.advance(1.0)  # relaxing with a 10 s half-life meanwhile
    adm.finished("l3", outcome(clock, "l3", 10, 0.5, on_time=False))
    stretch = (1 + 0.25 * 0.5**0.1) * 1.25
    assert adm.critical_path_s == pytest.approx(prior * stretch)
    clock.advance(10.0)  # the stretch relaxes with time: a bad spell never refuses everything for good
    assert adm.critical_path_s == pytest.approx(prior * (1 + (stretch - 1) / 2))
    clock.advance(600.0)
    for i in range(40):
        adm.finished(f"s{i}", outcome(clock, f"s{i}", 10, latency_s=3.0))  # the provider is slower now
    assert adm.critical_path_s == pytest.approx(1.1 * 6.0, rel=0.05)


class _Silent:
    """A budget actor that never answers (its node is gone)."""

    class free_for_planning:  # stands in for a Ray actor method
        @staticmethod
        def remote() -> object:
            return asyncio.Event().wait()


async def test_no_budget_can_be_had_while_the_ledger_does_not_answer():
    clock = FakeClock()
    adm = admission(clock)
    adm._actor = _Silent()
    adm._failed("GetTimeoutError")  # what the sync loop records when the actor does not answer
    assert await adm.admit("early", WORKFLOW, WORKFLOW.defaults, RunDeadline.start(30, clock)) is None
    clock.advance(10.5)  # BudgetConfig.ledger_timeout_s: long enough for Ray to restart or replace it
    why = await adm.admit("r", WORKFLOW, WORKFLOW.defaults, RunDeadline.start(30, clock))
    assert why is not None and "no budget can be had" in why and "GetTimeoutError" in why
    adm._sync_task.cancel()
