"""The simulator's pure parts: plans are reproducible, the content convention holds, faults bite."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tailrace.engine.sim import (
    REFUSAL_TEXT,
    SCENARIOS,
    Fault,
    Finish,
    ModelProfile,
    SimConfig,
    count_tokens,
    make_features,
    plan_response,
    profile_class,
    scenario,
)
from tailrace.engine.sim.content import parse_contract
from tailrace.engine.sim.ratelimit import RateLimiter, duration_string

SCHEMA = {
    "type": "object",
    "required": ["ticket_id", "intent", "summary", "score", "urgent", "tags", "customer"],
    "properties": {
        "ticket_id": {"type": "string"},
        "intent": {"enum": ["refund", "delivery", "other"]},
        "summary": {"type": "string", "maxLength": 2000},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "urgent": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "customer": {
            "type": "object",
            "required": ["name", "order_id"],
            "properties": {"name": {"type": "string"}, "order_id": {"type": "string"}},
        },
    },
    "additionalProperties": False,
}
IDS = ["TCK-48213", "ORD-7Q2K9"]


def system_prompt(schema: dict | None = SCHEMA, ids: list[str] | None = None) -> str:
    parts = ["You triage tickets."]
    if schema is not None:
        parts.append(f"Reply with only a JSON object conforming to <schema>{json.dumps(schema)}</schema>")
    if ids:
        parts.append(f"Copy these identifiers verbatim: <ids>{json.dumps(ids)}</ids>")
    return "\n".join(parts)


def features(
    user: str = "Where is my parcel?",
    *,
    schema: dict | None = SCHEMA,
    ids: list[str] | None = IDS,
    model: str = "gpt-4.1",
    max_tokens: int = 600,
    api: str = "openai",
):
    return make_features(api, model, [system_prompt(schema, ids), user], max_tokens)  # type: ignore[arg-type]


def test_same_seed_same_plans_and_different_seed_different_plans() -> None:
    cfg = scenario("heavy-tail", seed=7)
    feats = [features(f"question {i}") for i in range(40)]
    first = [plan_response(cfg, f, occurrence=0) for f in feats]
    again = [plan_response(scenario("heavy-tail", seed=7), f, occurrence=0) for f in reversed(feats)][::-1]
    assert first == again
    other = [plan_response(scenario("heavy-tail", seed=8), f, occurrence=0) for f in feats]
    assert [p.text for p in first] != [p.text for p in other]
    assert [p.ttft_s for p in first] != [p.ttft_s for p in other]


def test_occurrence_gives_an_independent_draw_and_stream_does_not_matter() -> None:
    cfg = scenario("clean", seed=1)
    f = features()
    assert plan_response(cfg, f, 0) != plan_response(cfg, f, 1)
    streamed = make_features("openai", f.model, list(f.texts), f.max_tokens, stream=True)
    assert plan_response(cfg, streamed, 0) == plan_response(cfg, f, 0)


def test_clean_answers_conform_and_copy_ids() -> None:
    cfg = scenario("clean", seed=3)
    for i in range(60):
        plan = plan_response(cfg, features(f"ticket {i}"), 0)
        assert plan.fault == Fault.OK and plan.status == 200 and plan.finish == Finish.STOP
        value = json.loads(plan.text)
        jsonschema.validate(value, SCHEMA)
        assert all(i in plan.text for i in IDS)
        assert plan.output_tokens == count_tokens(plan.text) <= 0.9 * 600
        assert "".join(plan.chunks) == plan.text and len(plan.chunks) <= cfg.max_stream_chunks


def test_id_placement_prefers_id_named_properties() -> None:
    plan = plan_response(scenario("clean"), features(), 0)
    value = json.loads(plan.text)
    assert value["ticket_id"] == "TCK-48213"
    assert value["customer"]["order_id"] == "ORD-7Q2K9"
    schema = {
        "type": "object",
        "properties": {"ref_ids": {"type": "array", "items": {"type": "string"}}, "note": {"type": "string"}},
    }
    value = json.loads(plan_response(scenario("clean"), features(schema=schema), 0).text)
    assert value["ref_ids"] == IDS
    schema = {"type": "object", "properties": {"note": {"type": "string"}, "n": {"type": "integer"}}}
    value = json.loads(plan_response(scenario("clean"), features(schema=schema), 0).text)
    assert all(i in value["note"] for i in IDS)


def test_pydantic_style_schema_with_refs_and_optional() -> None:
    schema = {
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {"sku_id": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["sku_id", "qty"],
            }
        },
        "type": "object",
        "properties": {"item": {"$ref": "#/$defs/Item"}, "comment": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["item", "comment"],
    }
    plan = plan_response(scenario("clean"), features(schema=schema, ids=["SKU-1"]), 0)
    value = json.loads(plan.text)
    jsonschema.validate(value, schema)
    assert value["item"]["sku_id"] == "SKU-1"


def test_plain_text_answer_contains_ids() -> None:
    plan = plan_response(scenario("clean"), features(schema=None), 0)
    assert all(i in plan.text for i in IDS)
    with pytest.raises(ValueError):
        json.loads(plan.text)


@pytest.mark.parametrize(
    "fault",
    [Fault.EMPTY, Fault.TRUNCATED, Fault.REFUSAL, Fault.SCHEMA_MISS, Fault.ALTERED_ID, Fault.NOT_JSON, Fault.FILTERED],
)
def test_invalid_output_faults_fail_validation(fault: Fault) -> None:
    cfg = scenario("clean", seed=5)
    for i in range(10):
        f = features(f"case {i}", max_tokens=300)
        plan = plan_response(cfg, f, 0, forced=fault)
        assert plan.fault == fault and plan.status == 200

        def valid(text: str) -> bool:
            try:
                jsonschema.validate(json.loads(text), SCHEMA)
            except (ValueError, jsonschema.ValidationError):
                return False
            return all(i in text for i in IDS)

        assert not valid(plan.text)
        if fault == Fault.TRUNCATED:
            assert plan.finish == Finish.LENGTH and plan.output_tokens == 300
        if fault == Fault.REFUSAL:
            assert plan.text == REFUSAL_TEXT and plan.finish == Finish.REFUSAL
        if fault == Fault.SCHEMA_MISS:
            json.loads(plan.text)  # still JSON, only the schema fails
        if fault == Fault.ALTERED_ID:
            assert sum(i in plan.text for i in IDS) == len(IDS) - 1


def test_inapplicable_faults_become_ok() -> None:
    plan = plan_response(scenario("clean"), features(schema=None, ids=[]), 0, forced=Fault.SCHEMA_MISS)
    assert plan.fault == Fault.OK


def test_truncated_text_answer_is_cut_at_max_tokens() -> None:
    plan = plan_response(scenario("clean"), features(schema=None, max_tokens=50), 0, forced=Fault.TRUNCATED)
    assert plan.finish == Finish.LENGTH and plan.output_tokens == 50 and len(plan.text) == 200


def test_error_faults_have_statuses_per_api() -> None:
    cfg = scenario("clean")
    assert plan_response(cfg, features(), 0, forced=Fault.OVERLOADED).status == 503
    assert (
        plan_response(cfg, features(api="anthropic", model="claude-sonnet-4-5"), 0, forced=Fault.OVERLOADED).status
        == 529
    )
    assert plan_response(cfg, features(), 0, forced=Fault.RATE_LIMITED).retry_after_s is not None
    assert plan_response(cfg, features(), 0, forced=Fault.QUOTA).retry_after_s is None


def test_context_window_is_enforced() -> None:
    cfg = scenario(
        "clean",
        model_profiles={"tiny": ModelProfile(ttft_median_s=0.5, ttft_sigma=0.1, tokens_per_s=100, context_window=500)},
    )
    assert plan_response(cfg, features(model="tiny", max_tokens=400), 0).fault == Fault.CONTEXT_LENGTH
    assert plan_response(cfg, features(model="tiny", max_tokens=200), 0).fault == Fault.OK


def test_heavy_tail_rates_and_latency_shape() -> None:
    cfg = scenario("heavy-tail", seed=11)
    plans = [plan_response(cfg, features(f"q{i}", schema=None), 0) for i in range(3000)]
    share = {f: sum(p.fault == f for p in plans) / len(plans) for f in Fault}
    assert 0.025 < share[Fault.STRAGGLER] < 0.06
    assert 0.008 < share[Fault.EMPTY] < 0.025
    assert share[Fault.OK] > 0.85
    ok = sorted(p.total_s for p in plans if p.fault == Fault.OK)
    slow = [p.total_s for p in plans if p.fault == Fault.STRAGGLER]
    assert sum(slow) / len(slow) > 2.5 * ok[len(ok) // 2]


def test_clean_has_no_faults_at_all() -> None:
    cfg = scenario("clean", seed=2)
    assert all(plan_response(cfg, features(f"q{i}"), 0).fault == Fault.OK for i in range(300))


def test_brownout_degrades_only_the_chosen_model_inside_its_window() -> None:
    cfg = scenario("brownout", seed=4)
    b = cfg.brownout
    assert b is not None and b.model == "gpt-4.1"
    inside, outside = b.offset_s + 1.0, b.offset_s + b.duration_s + 1.0

    def overloaded_share(model: str, t: float) -> float:
        plans = [plan_response(cfg, features(f"q{i}", model=model), 0, sim_time=t) for i in range(400)]
        return sum(p.fault == Fault.OVERLOADED for p in plans) / len(plans)

    assert 0.3 < overloaded_share("gpt-4.1", inside) < 0.5
    assert overloaded_share("gpt-4.1", outside) == 0
    assert overloaded_share("gpt-4o-mini", inside) == 0
    f = features("same", model="gpt-4.1")
    slow = plan_response(cfg, f, 0, sim_time=inside + b.period_s)
    fast = plan_response(cfg, f, 0, sim_time=outside)
    if slow.fault == Fault.OK:
        assert slow.degraded and slow.ttft_s == pytest.approx(fast.ttft_s * b.latency_factor)


def test_script_and_force_fault_and_validation() -> None:
    cfg = scenario("clean", force_fault={"gpt-4o": "http_500"})
    assert cfg.force_fault["gpt-4o"] is Fault.HTTP_500
    with pytest.raises(ValueError):
        SimConfig(fault_rates={Fault.HANG: 0.7, Fault.EMPTY: 0.5})
    with pytest.raises(ValueError):
        scenario("nope")
    assert {"clean", "heavy-tail", "brownout", "tpm"} <= set(SCENARIOS)


def test_profile_mapping() -> None:
    assert profile_class("gpt-4o-mini") == "fast-small"
    assert profile_class("claude-haiku-4-5") == "fast-small"
    assert profile_class("gpt-4.1") == "mid"
    assert profile_class("claude-sonnet-4-5") == "mid"
    assert profile_class("gpt-5") == "strong"
    assert profile_class("claude-opus-4-1") == "strong"
    assert profile_class("some-nano-model") == "fast-small"
    assert profile_class("claude-opus-5") == "strong"
    assert profile_class("llama") == "mid"
    assert SimConfig().profile("gpt-4o-mini").tokens_per_s == 105


def test_parse_contract_from_several_messages() -> None:
    schema, ids = parse_contract(
        ['<schema>not json</schema> <ids>["A"]</ids>', '<schema>{"type": "object"}</schema> <ids>["B", "A"]</ids>']
    )
    assert schema == {"type": "object"} and ids == ["A", "B"]


def test_rate_limiter_and_duration_strings() -> None:
    lim = RateLimiter(tpm_limit=1000, rpm_limit=None)
    assert lim.admit("k", 600, now=0.0).ok
    rejected = lim.admit("k", 600, now=0.0)
    assert not rejected.ok and rejected.reason == "tokens"
    assert rejected.retry_after_s == pytest.approx(200 * 60 / 1000)
    assert lim.admit("k", 600, now=12.0).ok  # the bucket refilled
    assert lim.admit("other", 600, now=0.0).ok  # keys are independent
    assert lim.admit("k", 5000, now=100.0).reason == "too_large"
    assert duration_string(0.084) == "84ms"
    assert duration_string(1.0) == "1s"
    assert duration_string(360.0) == "6m0s"
    assert duration_string(17.25) == "17.25s"
