"""The driver's budget admission on fake time (no Ray): refuses at submission what cannot make its deadline,
learns what a run really costs and how long it really takes."""

from __future__ import annotations

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


async def test_refuses_at_submission_with_a_reason_and_admits_what_fits():
    clock = FakeClock()
    adm = admission(clock)
    need = adm.run_need()[KEY]
    assert 300 < need < 400  # two steps: max_tokens 100 + a guess of the rendered prompt
    opts = WORKFLOW.defaults.model_copy(update={"tenant": "t"})
    admitted = 0
    while await adm.admit(f"r{admitted}", WORKFLOW, opts, RunDeadline.start(3.5, clock)) is None:
        admitted += 1
    # 6000 free now, 100/s: what fits by the latest start (3.5 s - 1.5 x 2 s of critical path).
    assert admitted == int((6000 + 100 * 0.5) // need)
    why = await adm.admit("late", WORKFLOW, opts, RunDeadline.start(3.5, clock))
    assert why.startswith("budget_exhausted at submission") and KEY in why


async def test_learns_the_real_need_and_gives_back_what_a_run_did_not_use():
    clock = FakeClock()
    adm = admission(clock)
    opts = WORKFLOW.defaults
    assert await adm.admit("r1", WORKFLOW, opts, RunDeadline.start(30, clock)) is None
    clock.advance(0.01)  # the plan serves r1's need from what is free
    before = adm._planner.free(KEY, clock.monotonic())
    adm.finished("r1", outcome(clock, "r1", input_tokens=10, latency_s=0.5))
    after = adm._planner.free(KEY, clock.monotonic())
    assert after > before  # charged 2 x (10 + 100), planned more
    for i in range(30):
        adm.finished(f"x{i}", outcome(clock, f"x{i}", input_tokens=10, latency_s=0.5))
    assert adm.run_need()[KEY] == pytest.approx(2 * (10 + 100), rel=0.02)


async def test_late_admitted_runs_stretch_the_critical_path_and_slow_runs_teach_it():
    clock = FakeClock()
    adm = admission(clock)
    prior = adm.critical_path_s
    assert prior == pytest.approx(1.5 * 2.0)
    for i in range(3):
        adm.finished(f"l{i}", outcome(clock, f"l{i}", 10, 0.5, on_time=False))
    assert adm.critical_path_s == pytest.approx(prior * 1.25**3)
    adm._late_scale = 1.0
    for i in range(40):
        adm.finished(f"s{i}", outcome(clock, f"s{i}", 10, latency_s=3.0))  # the provider is slower than its prior
    assert adm.critical_path_s == pytest.approx(1.2 * 6.0, rel=0.05)
