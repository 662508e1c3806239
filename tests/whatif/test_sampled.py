"""The sampled provider: answers the real validator judges as fitted, timings drawn on fake time."""

from __future__ import annotations

import math
import random

import pytest

from tailrace.engine.clock import FakeClock
from tailrace.engine.outcomes import ErrorKind, StopKind
from tailrace.engine.providers.base import AttemptProgress, ProviderCall
from tailrace.engine.specs import OutputContract, StepSpec, WorkflowSpec
from tailrace.engine.validation import validate
from tailrace.whatif.fit import ErrorDraw, Gaps, ModelFit, StepModelFit, TraceFit, decode_tokens, invalid_kind
from tailrace.whatif.regimes import Regime
from tailrace.whatif.sampled import CURRENT_STEP, AnswerBook, SampledProvider, StepContext
from tailrace.whatif.survival import Component, LogNormal, Mixture
from tailrace.whatif.virtual_time import run_on_fake_time

SCHEMA = {
    "type": "object",
    "required": ["ticket_id", "intent"],
    "properties": {"ticket_id": {"type": "string"}, "intent": {"enum": ["refund", "other"]}},
}
JSON_STEP = StepSpec(
    id="classify",
    prompt="Classify {{input.ticket_id}}",
    models=[{"provider": "openai", "model": "gpt-4.1", "max_tokens": 200}],
    output=OutputContract(kind="json", json_schema=SCHEMA, copy_ids=["ticket_id"]),
)
TEXT_STEP = StepSpec(
    id="reply",
    prompt="Reply about {{input.ticket_id}}",
    models=[{"provider": "openai", "model": "gpt-4.1", "max_tokens": 200}],
    output=OutputContract(kind="text", copy_ids=["ticket_id"]),
)
INPUTS = {"ticket_id": "TCK-4711"}


@pytest.mark.parametrize("step", [JSON_STEP, TEXT_STEP], ids=["json", "text"])
@pytest.mark.parametrize(
    "kind",
    [
        "valid",
        "truncated",
        "refused",
        "filtered",
        "tool_call",
        "empty",
        "not_json",
        "schema",
        "missing_id: ticket_id",
        "validator",
    ],
)
def test_every_answer_kind_is_judged_as_that_kind_by_the_real_validator(step, kind):
    text, stop = AnswerBook(random.Random(1)).get(StepContext("r1", step, INPUTS), kind)
    verdict = validate(step.output, text, stop, INPUTS)
    if kind == "valid":
        assert verdict.ok
        return
    assert not verdict.ok
    shows = kind not in ("validator",) and not (step is TEXT_STEP and kind in ("not_json", "schema"))
    # A kind the contract cannot show (a custom validator's, schema on a text step) is still invalid.
    assert invalid_kind(verdict.reason) == (kind if shows else "incomplete")


def _fit(hang: float = 0.0, errors: float = 0.0, brownout: tuple[float, float] | None = None) -> TraceFit:
    """gpt-4.1 answers in 0.5 s to first token and 0.01 s per token; three times slower in the brownout."""
    workflow = WorkflowSpec(name="w", inputs=["ticket_id"], steps=[JSON_STEP])
    latency = Mixture((Component(1.0 - hang, LogNormal(math.log(0.5), 1e-9), LogNormal(math.log(0.01), 1e-9)),), hang)
    rates = {ErrorKind.OVERLOADED: errors} if errors else {}
    draw = ErrorDraw(ErrorKind.OVERLOADED, True, 503, None, 0.2, None, "server_is_overloaded")
    regime = Regime(20.0, (brownout,) if brownout else (), (1.0, 3.0), (1.0, 3.0), (rates, rates))
    model = ModelFit("openai/gpt-4.1", latency, rates, {ErrorKind.OVERLOADED: [draw]} if errors else {}, regime, {})
    step = StepModelFit(0.0, {"empty": 1.0}, [100], [50], answered=1)
    return TraceFit(
        workflow, 20.0, {"openai/gpt-4.1": model}, {("classify", "openai/gpt-4.1"): step}, Gaps([0], [0], [0])
    )


def _attempt(fit: TraceFit, at: float = 0.0, timeout_s: float = 30.0):
    clock = FakeClock(start=0.0)
    provider = SampledProvider(fit, clock, seed=1)
    adapter = provider.adapter("openai")
    call = ProviderCall("openai", "openai", "gpt-4.1", "Classify TCK-4711", 200, timeout_s=timeout_s)

    async def main():
        CURRENT_STEP.set(StepContext("r1", JSON_STEP, INPUTS))
        await clock.sleep(at)
        progress = AttemptProgress(clock.monotonic())
        raw = await adapter.attempt(call, progress)
        return raw, progress, clock.monotonic() - at

    return run_on_fake_time(main(), clock)


def test_an_answer_streams_its_tokens_and_ends_at_ttft_plus_decode():
    raw, progress, took = _attempt(_fit())
    assert took == pytest.approx(0.5 + decode_tokens(100) * 0.01)  # 13 chunks: 92.3 tokens after the first
    assert raw.error is None and raw.stop_kind == StopKind.COMPLETE
    assert (raw.input_tokens, raw.output_tokens) == (50, 100)
    assert progress.first_token_mono == pytest.approx(0.5)
    assert progress.received_chars == pytest.approx(400, abs=20)  # ~4 characters a token, in 13 chunks
    assert validate(JSON_STEP.output, raw.text, raw.stop_kind, INPUTS).ok


def test_a_hang_ends_as_a_timeout_when_the_client_gives_up():
    raw, progress, took = _attempt(_fit(hang=1.0), timeout_s=7.0)
    assert took == pytest.approx(7.0)
    assert raw.error is not None and raw.error.kind == ErrorKind.TIMEOUT
    assert progress.first_token_mono is None


def test_errors_come_back_as_recorded():
    raw, _, took = _attempt(_fit(errors=1.0))
    assert raw.error is not None and (raw.error.kind, raw.error.status) == (ErrorKind.OVERLOADED, 503)
    assert took == pytest.approx(0.2)


def test_a_brownout_stays_where_it_was_when_replayed():
    fit = _fit(brownout=(10.0, 15.0))
    _, _, normal = _attempt(fit, at=5.0)
    _, _, brownout = _attempt(fit, at=12.0)
    _, _, wrapped = _attempt(fit, at=25.0)  # past the trace's end: time wraps around
    assert brownout == pytest.approx(3 * normal)
    assert wrapped == pytest.approx(normal)


def test_the_providers_time_stands_still_while_the_batch_pauses():
    clock = FakeClock(start=0.0)
    provider = SampledProvider(_fit(brownout=(10.0, 15.0)), clock, seed=1)
    provider.start()
    clock.advance(112.0)  # 12 s of work and a 100 s pause between two parts of the batch
    provider.pause(100.0)
    assert provider.elapsed() == pytest.approx(12.0)
    assert provider.fit.models["openai/gpt-4.1"].regime.state_at(provider.elapsed()) == 1
