"""The step runner racing hedged attempts on fake time: exact start times, refusals that do not spin,
the statistics tail control keeps. No Ray and no HTTP: a scripted in-process provider answers on
the fake clock (the real adapters against the simulator are covered by the integration tests)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tailrace.engine.clock import FakeClock, RunDeadline
from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, CancelReason, ErrorKind, ProviderError
from tailrace.engine.providers.base import AttemptProgress, ProviderCall, RawAttempt
from tailrace.engine.specs import HedgeConfig, ModelChoice, StepSpec
from tailrace.policies.attempts import Start
from tailrace.policies.hedging import TailTuning
from tailrace.policies.latency import LatencyConfig, model_key
from tailrace.policies.spend import Grant, Refusal, SpendAsk, Usage
from tailrace.runtime.step_runner import StepRequest, StepRunner
from tailrace.runtime.tail_control import TailControl


@dataclass
class Plan:
    first_token_s: float
    done_s: float
    text: str = "ok T-1"


class ScriptedProvider:
    """Answers each call by the next plan, on the fake clock: first token, then the rest at `done_s`."""

    kind = "openai"

    def __init__(self, clock: FakeClock, plans: list[Plan]) -> None:
        self.clock, self.plans, self.calls = clock, list(plans), 0
        self.cancelled = 0

    async def attempt(self, call: ProviderCall, progress: AttemptProgress) -> RawAttempt:
        plan = self.plans[min(self.calls, len(self.plans) - 1)]
        self.calls += 1
        try:
            await self.clock.sleep(plan.first_token_s)
            progress.on_text(plan.text[:2], self.clock.monotonic())
            await self.clock.sleep(plan.done_s - plan.first_token_s)
            progress.on_text(plan.text[2:], self.clock.monotonic())
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        progress.stop_reason = "stop"
        progress.input_tokens, progress.output_tokens = 20, 10
        return RawAttempt.from_progress(progress, "openai", self.clock.monotonic())

    async def aclose(self) -> None:
        pass


class RefuseDuplicates:
    def __init__(self) -> None:
        self.asks: list[str] = []

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        self.asks.append(ask.role)
        return Refusal("global budget: duplicates wait") if ask.role == "duplicate" else Grant(ask)

    async def settle(self, grant: Grant, used: Usage) -> None:
        pass


MODEL = ModelChoice(provider="openai", model="m", max_tokens=100, expected_ttft_s=1.0, expected_latency_s=2.0)
STEP = StepSpec(id="s", prompt="Answer {{input.t}}.", models=[MODEL], output={"copy_ids": ["t"]})


def request(clock: FakeClock, step: StepSpec = STEP) -> StepRequest:
    return StepRequest(
        run_id="r",
        workflow="w",
        tenant="t",
        step=step,
        inputs={"t": "T-1"},
        upstream={},
        deadline=RunDeadline(clock.time() + 30.0),
        extra_tokens=10_000,
    )


def control(clock: FakeClock) -> TailControl:
    """Warm: the model's TTFT quantile is exactly 1.0 s and its latency quantile 2.0 s."""
    tuning = TailTuning(latency=LatencyConfig(min_samples=5, window_s=600))
    tail = TailControl(HedgeConfig(ttft_quantile=0.9, latency_quantile=0.9), tuning, clock)
    for _ in range(5):
        tail.stats.observe(model_key("openai", "m"), "ok", 1.0, 2.0)
    return tail


async def run_on_fake_time(clock: FakeClock, coro, step_s: float = 0.01, limit_s: float = 60.0):
    task = asyncio.ensure_future(coro)
    elapsed = 0.0
    while not task.done() and elapsed < limit_s:
        for _ in range(20):
            await asyncio.sleep(0)
        clock.advance(step_s)
        elapsed += step_s
    return await task


async def test_slow_primary_is_beaten_by_a_duplicate_started_at_the_quantile():
    clock = FakeClock()
    provider = ScriptedProvider(clock, [Plan(10.0, 12.0), Plan(0.3, 0.5)])
    tail = control(clock)
    runner = StepRunner({"openai": provider}, clock, policy_factory=tail.policy_for, observer=tail)
    t0 = clock.time()
    result = await run_on_fake_time(clock, runner.run(request(clock)))
    assert result.ok and result.output == "ok T-1"
    primary, duplicate = result.attempts
    assert (primary.outcome, primary.cancel_reason) == (AttemptOutcome.CANCELLED, CancelReason.HEDGE_LOST)
    assert (duplicate.role, duplicate.outcome) == ("duplicate", AttemptOutcome.VALID)
    assert abs((duplicate.started_at - t0) - 1.0) < 0.02  # at the TTFT quantile
    assert abs((duplicate.ended_at - t0) - 1.5) < 0.03
    assert provider.cancelled == 1
    # The overtaken primary is kept as a censored sample (at least 1.5 s), not dropped.
    assert tail.stats.count(model_key("openai", "m")) == 5 + 2


async def test_refused_duplicate_is_not_asked_again_and_the_step_waits_on_its_primary():
    clock = FakeClock()
    # First token at 1.5 s: late for the 1.0 s trigger, in time for the 2.0 s timeout.
    provider = ScriptedProvider(clock, [Plan(1.5, 3.5)])
    tail = control(clock)
    gate = RefuseDuplicates()
    runner = StepRunner(
        {"openai": provider}, clock, policy_factory=tail.policy_for, gate_factory=lambda r: gate, observer=tail
    )
    result = await run_on_fake_time(clock, runner.run(request(clock)))
    assert result.ok and [a.role for a in result.attempts] == ["primary"]
    assert gate.asks == ["primary", "duplicate"]  # asked once, not on every loop turn
    assert provider.calls == 1


class AlwaysDuplicate:
    """A policy without feedback hooks that keeps asking for a duplicate."""

    def __init__(self) -> None:
        self.calls = 0

    def decide(self, attempts, now, deadline):
        self.calls += 1
        if not attempts:
            return Start(0, now, "primary")
        if any(a.outcome == AttemptOutcome.VALID for a in attempts):
            return None
        return Start(0, now, "duplicate")


async def test_refusal_with_a_policy_that_cannot_hear_it_waits_for_an_attempt_to_end():
    clock = FakeClock()
    provider = ScriptedProvider(clock, [Plan(1.0, 2.0)])
    policy = AlwaysDuplicate()
    runner = StepRunner(
        {"openai": provider}, clock, policy_factory=lambda r: policy, gate_factory=lambda r: RefuseDuplicates()
    )
    result = await run_on_fake_time(clock, runner.run(request(clock)))
    assert result.ok and len(result.attempts) == 1
    assert policy.calls <= 4


async def test_side_effect_step_is_never_duplicated_but_a_hung_call_is_killed_and_retried_with_its_key():
    clock = FakeClock()
    provider = ScriptedProvider(clock, [Plan(8.0, 9.0), Plan(0.3, 0.5)])
    tail = control(clock)
    runner = StepRunner({"openai": provider}, clock, policy_factory=tail.policy_for, observer=tail)
    step = STEP.model_copy(update={"side_effect": True})
    t0 = clock.time()
    result = await run_on_fake_time(clock, runner.run(request(clock, step)))
    assert result.ok and [a.role for a in result.attempts] == ["primary", "retry"]
    primary, retry = result.attempts
    assert (primary.outcome, primary.cancel_reason) == (AttemptOutcome.CANCELLED, CancelReason.STALLED)
    assert abs((retry.started_at - t0) - 2.0) < 0.02  # no first token by 2 x the 1.0 s TTFT trigger
    assert primary.idempotency_key == retry.idempotency_key == "tailrace-r-s"


async def test_hedging_off_kills_a_hung_call_at_its_timeout_and_retries():
    clock = FakeClock()
    provider = ScriptedProvider(clock, [Plan(8.0, 9.0), Plan(0.3, 0.5)])
    tail = TailControl(HedgeConfig(enabled=False), clock=clock)  # cold: the prior TTFT 1.0 s x 1.5
    runner = StepRunner({"openai": provider}, clock, policy_factory=tail.policy_for, observer=tail)
    t0 = clock.time()
    result = await run_on_fake_time(clock, runner.run(request(clock)))
    assert result.ok and [a.role for a in result.attempts] == ["primary", "retry"]
    primary, retry = result.attempts
    assert (primary.outcome, primary.cancel_reason) == (AttemptOutcome.CANCELLED, CancelReason.STALLED)
    assert abs((retry.started_at - t0) - 3.0) < 0.02
    assert provider.cancelled == 1
    # The kill is a censored sample and a health failure of the model.
    [sample] = tail.stats.snapshot()[model_key("openai", "m")][:1]
    assert sample.kind == "censored" and sample.ttft_censored and sample.timed_out


async def test_failures_feed_the_breaker_and_the_throttle():
    clock = FakeClock()
    tail = control(clock)
    key = model_key("openai", "m")

    def failed() -> AttemptRecord:
        return AttemptRecord(
            run_id="r",
            step_id="s",
            attempt=0,
            provider="openai",
            model="m",
            started_at=0,
            ended_at=0.1,
            latency_s=0.1,
            outcome=AttemptOutcome.ERROR,
            error=ProviderError(kind=ErrorKind.OVERLOADED, retryable=True),
        )

    for _ in range(5):
        tail.attempt_ended(request(clock), failed())
    assert tail.breakers.state(key, clock.monotonic()).value == "open"
    assert tail.throttle.tokens(key) == 5.0 and not tail.throttle.allows(key)
    assert tail.stats.health(key).failure_rate == 0.5 and tail.stats.health(key).unhealthy  # 5 answers, 5 failures


def _lost_race(tail: TailControl, clock: FakeClock, n: int) -> None:
    for i in range(n):
        clock.advance(0.1)
        req = request(clock)
        record = AttemptRecord(
            run_id=f"r{i}",
            step_id=req.step.id,
            attempt=0,
            provider="openai",
            model="m",
            started_at=clock.time() - 12.0,
            ended_at=clock.time(),
            latency_s=12.0,
            outcome=AttemptOutcome.CANCELLED,
            cancel_reason=CancelReason.HEDGE_LOST,
        )
        tail.attempt_started(req, req.step.models[0], "primary")
        tail.attempt_ended(req, record)


def test_races_lost_while_the_model_is_slowed_down_open_its_circuit():
    clock = FakeClock()
    tail = control(clock)  # warm: latency 2.0 s
    for _ in range(6):  # recent answers 6x slower than before: shifted, unhealthy
        tail.stats.observe(model_key("openai", "m"), "ok", 1.0, 12.0)
    assert tail.stats.health(model_key("openai", "m"), MODEL.expected_latency_s).unhealthy
    _lost_race(tail, clock, 5)  # every attempt lost to another model while slowed
    assert not tail.breakers.allows(model_key("openai", "m"), clock.monotonic())


def test_races_lost_by_a_healthy_model_are_just_hedging():
    clock = FakeClock()
    tail = control(clock)
    _lost_race(tail, clock, 8)
    assert tail.breakers.allows(model_key("openai", "m"), clock.monotonic())
