"""Fitting a trace recovers the provider that made it.

A provider with known behaviour (a lognormal time to first token, 5 % stragglers, 1 % hangs, 2 %
overloaded errors, and a brownout in the second quarter of every minute: three times slower, 40 %
overloaded) serves a batch replayed through the real runner with hedging on, so the trace's censoring
is the real policy's: stragglers backed up and cancelled, hangs cut at the deadline. The trace is
written by the real `TraceWriter`, read back, fitted and compared with the truth.
"""

from __future__ import annotations

import math

import pytest

from tailrace.cluster.trace import TraceConfig, TraceWriter
from tailrace.engine.outcomes import AttemptOutcome, ErrorKind
from tailrace.engine.specs import HedgeConfig, RunOptions, StepSpec, WorkflowSpec
from tailrace.policies.hedging import TailTuning
from tailrace.whatif.change import WhatIf, plan_for
from tailrace.whatif.fit import ErrorDraw, Gaps, ModelFit, StepModelFit, TraceFit, fit_trace
from tailrace.whatif.prediction import predict
from tailrace.whatif.regimes import Regime
from tailrace.whatif.replay import Replay, ReplayPlan
from tailrace.whatif.survival import Component, LogNormal, Mixture
from tailrace.whatif.trace_data import TraceSettings, read_trace

KEY = "openai/gpt-4.1"
CYCLE_S = 60.0
BROWNOUT = (15.0, 30.0)  # of every minute
RUNS = 600
USUAL = LogNormal(math.log(0.4), 0.4)


def workflow() -> WorkflowSpec:
    step = {
        "prompt": "Answer {{input.ticket_id}}",
        "models": [
            {
                "provider": "openai",
                "model": "gpt-4.1",
                "max_tokens": 200,
                "expected_ttft_s": 0.4,
                "expected_latency_s": 1.4,
            },
            {
                "provider": "anthropic",
                "model": "claude-haiku-4-5",
                "max_tokens": 200,
                "expected_ttft_s": 0.3,
                "expected_latency_s": 1.0,
            },
        ],
        "output": {"copy_ids": ["ticket_id"]},
    }
    return WorkflowSpec(
        name="two_steps",
        inputs=["ticket_id"],
        steps=[StepSpec(id="a", **step), StepSpec(id="b", depends_on=["a"], **step)],
    )


def truth() -> TraceFit:
    wf = workflow()
    latency = Mixture(
        (
            Component(0.94, USUAL, LogNormal(math.log(0.01), 0.2)),
            Component(0.05, LogNormal(math.log(0.4 * 6), 0.3), LogNormal(math.log(0.06), 0.2)),
        ),
        0.01,
    )
    rates = ({ErrorKind.OVERLOADED: 0.02}, {ErrorKind.OVERLOADED: 0.4})
    draw = ErrorDraw(ErrorKind.OVERLOADED, True, 503, None, 0.05, None, "overloaded")
    fallback = Mixture((Component(1.0, LogNormal(math.log(0.3), 0.3), LogNormal(math.log(0.008), 0.2)),), 0.0)
    models = {
        KEY: ModelFit(
            KEY,
            latency,
            rates[0],
            {ErrorKind.OVERLOADED: [draw]},
            Regime(CYCLE_S, (BROWNOUT,), (1.0, 3.0), (1.0, 3.0), rates),
            {},
        ),
        "anthropic/claude-haiku-4-5": ModelFit(
            "anthropic/claude-haiku-4-5", fallback, {}, {}, Regime.steady(CYCLE_S, {}), {}
        ),
    }
    steps = {(s, k): StepModelFit(0.01, {"empty": 1.0}, [100], [60], answered=100) for s in ("a", "b") for k in models}
    return TraceFit(wf, CYCLE_S, models, steps, Gaps([0.01], [0.01], [0.005]))


def write_trace(tmp_path):
    wf = workflow()
    # A deadline that leaves gpt-4.1 the first rung (at 4 s the deadline-aware ladder sends most steps to
    # the faster haiku, and the fit would have too few gpt-4.1 attempts to find its stragglers in) and
    # still misses some runs (at 6 s, since the circuit opens on races lost in the brownout, none).
    plan = ReplayPlan(wf, RunOptions(deadline_s=5.0), HedgeConfig(), TailTuning(), None, 2, 8, 0.25)
    outcomes = Replay(truth(), plan, [(f"r{i}", {"ticket_id": f"T-{i}"}) for i in range(RUNS)], seed=3).run()
    path = tmp_path / "known.trace.jsonl"
    settings = {"options": plan.options.model_dump(mode="json"), "executors": 2, "max_in_flight": 8}
    writer = TraceWriter(TraceConfig(path=str(path)), wf, settings=settings)
    for o in outcomes:
        writer.write(o, {"ticket_id": o.run_id.replace("r", "T-")})
    writer.close()
    return path, outcomes


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    path, _ = write_trace(tmp_path_factory.mktemp("fit"))
    data = read_trace(path)
    return data, fit_trace(data)


def test_the_latency_fit_recovers_the_known_distribution_through_the_policys_censoring(known):
    data, fit = known
    attempts = [a for a in data.attempts if a.model == "gpt-4.1"]
    cancelled = sum(a.outcome == AttemptOutcome.CANCELLED for a in attempts)
    # Hedging did cancel stragglers: the fit had censored samples to deal with (fewer since a race lost
    # while browned out opens the circuit: the slowed model gets fewer attempts).
    assert cancelled > 40
    model = fit.models[KEY]
    true = truth().models[KEY].latency
    for q in (0.5, 0.9):
        assert model.latency.ttft_quantile(q) == pytest.approx(true.ttft_quantile(q), rel=0.1), q
    # Beyond the hedge trigger most stragglers were cancelled before their first token: the fit sees
    # them only as "slower than this", so straggler and hang share what lies beyond, and the p95 (in
    # the stragglers) is known less well than the body.
    assert model.latency.ttft_quantile(0.95) == pytest.approx(true.ttft_quantile(0.95), rel=0.3)
    usual = model.latency.components[0]
    assert usual.ttft.median == pytest.approx(USUAL.median, rel=0.08)
    assert usual.per_token.median == pytest.approx(0.01, rel=0.15)
    assert model.latency.components[0].weight == pytest.approx(0.94, abs=0.04)


def test_the_brownout_is_found_where_it_was(known):
    data, fit = known
    regime = fit.models[KEY].regime
    true = truth().models[KEY].regime
    grid = [i * data.span_s / 2000 for i in range(2000)]
    agree = sum(regime.state_at(t) == true.state_at(t) for t in grid) / len(grid)
    assert agree > 0.9
    assert regime.ttft_factor[1] == pytest.approx(3.0, rel=0.25)
    assert regime.error_rates[1][ErrorKind.OVERLOADED] == pytest.approx(0.4, abs=0.1)
    assert regime.error_rates[0][ErrorKind.OVERLOADED] == pytest.approx(0.02, abs=0.015)


def test_a_steady_provider_has_no_regime(tmp_path):
    wf = workflow()
    steady = truth()
    model = steady.models[KEY]
    steady.models[KEY] = ModelFit(
        KEY, model.latency, model.error_rate, model.errors, Regime.steady(CYCLE_S, model.error_rate), {}
    )
    plan = ReplayPlan(wf, RunOptions(deadline_s=4.0), HedgeConfig(), TailTuning(), None, 2, 8, 0.25)
    outcomes = Replay(steady, plan, [(f"r{i}", {"ticket_id": f"T-{i}"}) for i in range(300)], seed=5).run()
    path = tmp_path / "steady.trace.jsonl"
    writer = TraceWriter(TraceConfig(path=str(path)), wf, settings={"executors": 2, "max_in_flight": 8})
    for o in outcomes:
        writer.write(o, {"ticket_id": "T"})
    writer.close()
    assert fit_trace(read_trace(path)).models[KEY].regime.intervals == ()


def test_replaying_the_trace_reproduces_its_recorded_hit_rate_within_the_interval(known):
    data, fit = known
    prediction = predict(data, WhatIf(), replays=3, fit=fit)
    recorded = prediction.recorded
    assert 0.6 < recorded.hit_rate < 0.999  # a trace with misses, so the check can fail
    assert prediction["hit_rate"].contains(recorded.hit_rate)
    assert prediction["extra_tokens"].contains(recorded.extra_tokens)
    # This workload sits at the deadline-aware ladder's threshold (the first step's gpt-4.1 p90 is close
    # to its time share), where small differences move steps to the faster rung: p50 is close, not exact.
    assert prediction["p50"].mean == pytest.approx(recorded.p50, rel=0.08)


def test_the_plan_follows_the_trace_settings_and_the_change(known):
    data, _ = known
    assert isinstance(data.settings, TraceSettings)
    plan = plan_for(
        data, WhatIf(deadline_s=2.0, hedge={"enabled": False}, ladder={"b": ["claude-haiku-4-5"]}, tpm=9000)
    )
    assert plan.options.deadline_s == 2.0 and plan.concurrency == 8 and plan.executors == 2
    assert not plan.hedge.enabled
    assert [m.model for m in plan.workflow.step("b").models] == ["claude-haiku-4-5"]
    assert [m.model for m in plan.workflow.step("a").models] == ["gpt-4.1", "claude-haiku-4-5"]
    assert plan.budget is not None and {lim.account: lim.tpm for lim in plan.budget.limits} == {
        "openai": 9000,
        "anthropic": 9000,
    }
