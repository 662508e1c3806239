"""Tail control end to end: real attempts raced in an executor on Ray, real SDKs, the simulator's log.

Latency priors and tuning are scaled to the simulator's time scale (simulated seconds x TIME_SCALE),
and model profiles are pinned (no random spread), so each scenario plays out the same way every time.
"""

from __future__ import annotations

import uuid

import pytest
import ray

from tailrace.actors.latency_stats import stats_actor
from tailrace.actors.step_executor import StepExecutor
from tailrace.cluster.api import run_batch
from tailrace.cluster.providers import SimulatorEndpoints, resolve_providers
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import AttemptOutcome, CancelReason
from tailrace.engine.sim import BrownoutConfig, Fault, ModelProfile
from tailrace.engine.specs import HedgeConfig, RunOptions
from tailrace.policies.hedging import TailTuning, scaled_hedge

pytestmark = pytest.mark.usefixtures("ray_cluster")

TIME_SCALE = 0.1  # 1 simulated second = 100 ms: the scenarios keep their order on a busy machine
STEADY = ModelProfile(
    ttft_median_s=1.0, ttft_sigma=0.0, tokens_per_s=100, tps_sigma=0.0, output_tokens_median=40, output_tokens_sigma=0.0
)
TUNING = TailTuning().scaled(TIME_SCALE)
HEDGE = scaled_hedge(HedgeConfig(), TIME_SCALE)


def endpoints(sim) -> SimulatorEndpoints:
    return SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)


def one_step(hedge: dict | None = None, side_effect: bool = False) -> dict:
    # Priors in real seconds: about what the pinned profile takes at this time scale.
    prior = {"expected_ttft_s": 1.0 * TIME_SCALE, "expected_latency_s": 1.6 * TIME_SCALE}
    step = {
        "id": "answer",
        "prompt": "Answer ticket {{input.ticket_id}}.",
        "side_effect": side_effect,
        "models": [
            {"provider": "openai", "model": "gpt-4.1", "max_tokens": 300, **prior},
            {"provider": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 300, **prior},
        ],
        "output": {"copy_ids": ["ticket_id"]},
    }
    if hedge is not None:
        step["hedge"] = hedge
    return {"name": "one_step", "inputs": ["ticket_id"], "steps": [step]}


def run(sim, workflow: dict, n: int, **kwargs):
    outcomes = []
    summary = run_batch(
        workflow_from_dict(workflow),
        [{"ticket_id": f"T-{i}", "id": f"r{i}"} for i in range(n)],
        options=RunOptions(deadline_s=kwargs.pop("deadline_s", 10)),
        simulator=endpoints(sim),
        on_done=outcomes.append,
        hedge=kwargs.pop("hedge", HEDGE),
        tuning=kwargs.pop("tuning", TUNING),
        **kwargs,
    )
    return summary, outcomes


def test_straggler_is_beaten_by_a_duplicate_and_its_request_is_cancelled(simulator):
    sim = simulator(
        "clean",
        seed=1,
        time_scale=TIME_SCALE,
        straggler_factor=(20.0, 20.0),
        model_profiles={"gpt-4.1": STEADY},
        script={"gpt-4.1": [Fault.STRAGGLER]},
    )
    # A timeout well past the duplicate's answer, so the straggler loses the race rather than time out.
    summary, [outcome] = run(sim, one_step(hedge={"timeout_factor": 8.0}), 1)
    assert summary.delivered == 1
    primary, duplicate = outcome.attempts
    assert (primary.role, primary.outcome, primary.cancel_reason) == (
        "primary",
        AttemptOutcome.CANCELLED,
        CancelReason.HEDGE_LOST,
    )
    assert (duplicate.role, duplicate.model, duplicate.outcome) == ("duplicate", "gpt-4.1", AttemptOutcome.VALID)
    # Cold model: the duplicate waited 1.5x the TTFT prior (75 ms), far less than the straggler's 1 s.
    assert 0.07 <= duplicate.started_at - primary.started_at < 0.5
    assert outcome.latency_s < 20 * TIME_SCALE
    log = sim.log_records()
    straggler = next(r for r in log if r["fault"] == "straggler")
    assert straggler["cancelled"] and straggler["output_tokens"] < 40
    assert [r["cancelled"] for r in log if r["fault"] == "ok"] == [False]


def test_an_invalid_duplicate_does_not_use_up_the_cap_the_step_recovers_on_the_next_rung(simulator):
    # The primary straggles (20x) without a first token; its one allowed duplicate answers first, empty.
    # Recovery is not speculation: the next rung starts at once. (A timeout far from the trigger, so a
    # slow budget grant on a busy machine cannot let the timeout overtake the duplicate.)
    sim = simulator(
        "clean",
        seed=1,
        time_scale=TIME_SCALE,
        straggler_factor=(20.0, 20.0),
        model_profiles={"gpt-4.1": STEADY},
        script={"gpt-4.1": [Fault.STRAGGLER, Fault.EMPTY]},
    )
    summary, [outcome] = run(sim, one_step(hedge={"max_duplicates": 1, "timeout_factor": 8.0}), 1)
    assert summary.delivered == 1
    primary, duplicate, retry = outcome.attempts
    assert (duplicate.role, duplicate.outcome, duplicate.invalid_reason) == (
        "duplicate",
        AttemptOutcome.INVALID,
        "empty",
    )
    assert (retry.role, retry.model, retry.outcome) == ("retry", "claude-haiku-4-5", AttemptOutcome.VALID)
    assert 0 <= retry.started_at - duplicate.ended_at < 0.5 * TIME_SCALE  # at once, not after the straggler
    assert (primary.outcome, primary.cancel_reason) == (AttemptOutcome.CANCELLED, CancelReason.HEDGE_LOST)
    assert "T-0" in outcome.outputs["answer"]


def test_during_a_brownout_extra_attempts_move_to_the_alternative_model(simulator):
    # gpt-4.1 answers 6x slower than its spec says (8.4 simulated seconds instead of ~1.4); haiku is healthy.
    brownout = BrownoutConfig(
        model="gpt-4.1", offset_s=0.0, period_s=1e6, duration_s=1e6, latency_factor=6.0, overloaded_rate=0.0
    )
    sim = simulator(
        "brownout",
        seed=2,
        time_scale=TIME_SCALE,
        brownout=brownout,
        model_profiles={"gpt-4.1": STEADY, "claude-haiku-4-5": STEADY},
    )
    summary, outcomes = run(sim, one_step(), 60, max_in_flight=6)
    assert summary.delivered == 60
    steps = sorted(outcomes, key=lambda o: o.attempts[0].started_at)
    on_slow = [o for o in steps if o.attempts[0].model == "gpt-4.1"]
    # Until the first slow attempts are given up on, the engine cannot know. A timed-out attempt is a
    # health failure: its recovery goes to haiku at once, duplicates follow, and after a few the
    # circuit opens, so primaries go to haiku too (half-open probes aside).
    assert on_slow[0] is steps[0] and len(on_slow) <= 20
    assert sum(o.attempts[0].model == "claude-haiku-4-5" for o in steps[-20:]) >= 16
    # Every step that started on gpt-4.1 was answered by haiku: the slow attempts were cancelled.
    for o in on_slow:
        winner = next(a for a in o.attempts if a.outcome == AttemptOutcome.VALID)
        assert winner.model == "claude-haiku-4-5"
        assert all(a.outcome == AttemptOutcome.CANCELLED for a in o.attempts if a.model == "gpt-4.1")
        assert sum(a.model == "gpt-4.1" for a in o.attempts) <= 2  # never piled onto the slow model


def test_side_effect_step_is_never_hedged_and_retries_keep_its_idempotency_key(simulator):
    sim = simulator(
        "clean",
        seed=1,
        time_scale=TIME_SCALE,
        straggler_factor=(6.0, 6.0),
        model_profiles={"gpt-4.1": STEADY},
        script={"gpt-4.1": [Fault.HTTP_500, Fault.STRAGGLER]},
    )
    summary, [outcome] = run(sim, one_step(side_effect=True), 1)
    assert summary.delivered == 1
    # A 500, then a straggler (6x) that is never duplicated but killed at its timeout and retried.
    assert [(a.role, a.outcome, a.cancel_reason) for a in outcome.attempts] == [
        ("primary", AttemptOutcome.ERROR, None),
        ("retry", AttemptOutcome.CANCELLED, CancelReason.STALLED),
        ("retry", AttemptOutcome.VALID, None),
    ]
    keys = {a.idempotency_key for a in outcome.attempts}
    assert len(keys) == 1 and None not in keys
    sent = [r["idempotency_key"] for r in sim.log_records()]
    assert sent == [keys.pop()] * 3  # the same key on the wire, one request per attempt: no duplicate


def test_new_executor_starts_warm_from_the_shared_statistics(simulator):
    sim = simulator("clean", seed=3, time_scale=TIME_SCALE, model_profiles={"gpt-4.1": STEADY})
    name = f"stats-{uuid.uuid4().hex[:8]}"
    # A window long enough that starting the new executor on a busy machine cannot outlast it.
    tuning = TUNING.model_copy(update={"latency": TUNING.latency.model_copy(update={"window_s": 120.0})})
    stats = stats_actor(name, tuning.latency)
    try:
        summary, _ = run(sim, one_step(), 30, stats_name=name, tuning=tuning)
        assert summary.delivered == 30
        assert ray.get(stats.counts.remote()).get("openai/gpt-4.1", 0) >= 25
        providers = resolve_providers(workflow_from_dict(one_step()), endpoints(sim))
        fresh = StepExecutor.options(max_concurrency=100, num_cpus=0).remote(
            providers, "fresh", hedge=HEDGE, tuning=tuning, stats_name=name
        )
        try:
            ray.get(fresh.sync_stats.remote())
            seen = ray.get(fresh.tail_snapshot.remote())
            assert seen["samples"].get("openai/gpt-4.1", 0) >= 25  # warm before its first step
        finally:
            ray.kill(fresh)
    finally:
        ray.kill(stats)


def test_a_cold_model_with_a_prior_ten_times_too_short_still_delivers(simulator):
    """A new user's optimistic priors: each model answers in ~0.1 s (first token) but its spec says
    10 ms. Without backoff every attempt was killed at 2 x 1.5 x the prior, forever (1 run of 20
    delivered); each timeout now moves the cold trigger to where it fired, so attempts soon outlast it."""
    sim = simulator(
        "clean", seed=5, time_scale=TIME_SCALE, model_profiles={"gpt-4.1": STEADY, "claude-haiku-4-5": STEADY}
    )
    optimistic = {"max_tokens": 300, "expected_ttft_s": 0.01, "expected_latency_s": 0.016}
    workflow = {
        "name": "optimistic",
        "inputs": ["ticket_id"],
        "steps": [
            {
                "id": "openai",
                "prompt": "Answer {{input.ticket_id}}.",
                "models": [{"provider": "openai", "model": "gpt-4.1", **optimistic}],
            },
            {
                "id": "anthropic",
                "prompt": "Answer {{input.ticket_id}}.",
                "models": [{"provider": "anthropic", "model": "claude-haiku-4-5", **optimistic}],
            },
        ],
    }
    summary, outcomes = run(sim, workflow, 12, max_in_flight=12)
    assert summary.delivered == 12, summary.failures
    for step in ("openai", "anthropic"):
        stalled = [
            a for o in outcomes for a in o.attempts if a.step_id == step and a.cancel_reason == CancelReason.STALLED
        ]
        # Timeouts double from 30 ms: a few rounds until they pass the ~100 ms first token, not one per attempt.
        assert len(stalled) < 6 * 12, (step, len(stalled))
