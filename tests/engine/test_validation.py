"""The quality floor: a table of answers and their verdicts, the validator registry, contract prompts."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pydantic
import pytest

from tailrace.engine.errors import SpecError
from tailrace.engine.outcomes import ProviderError, StopKind
from tailrace.engine.specs import OutputContract
from tailrace.engine.validation import (
    Verdict,
    contract_instructions,
    register_validator,
    registered_validators,
    resolve_schema_model,
    unregister_validator,
    validate,
)

OK = StopKind.COMPLETE
INPUTS = {"ticket_id": "TCK-10400", "order_id": 439563, "quote": 'say "hi"', "city": "Zürich"}
SCHEMA = {
    "type": "object",
    "required": ["ticket_id", "intent"],
    "properties": {"ticket_id": {"type": "string"}, "intent": {"enum": ["refund", "other"]}},
}


class Triage(pydantic.BaseModel):
    ticket_id: str
    urgency: int


TEXT = OutputContract()
JSON_ANY = OutputContract(kind="json")
JSON_SCHEMA = OutputContract(kind="json", json_schema=SCHEMA)
JSON_MODEL = OutputContract(kind="json", schema_model=Triage)
# A string reference must name an importable module; the test module's own name depends on how
# pytest imports it, so use a model of the engine itself.
JSON_MODEL_STR = OutputContract(kind="json", schema_model="tailrace.engine.outcomes:ProviderError")
IDS = OutputContract(copy_ids=["ticket_id", "order_id"])
JSON_IDS = OutputContract(kind="json", copy_ids=["quote", "city"])
LONG = OutputContract(min_chars=10)
LENIENT = OutputContract(min_chars=0)
GOOD = '{"ticket_id": "TCK-10400", "intent": "refund"}'

CASES = [
    # (name, contract, text, stop kind, expected ok, expected reason)
    ("complete text", TEXT, "  Hello.\n", OK, True, None),
    ("truncated", TEXT, "Hello", StopKind.TRUNCATED, False, "truncated"),
    ("refused", TEXT, "Sorry", StopKind.REFUSED, False, "refused"),
    ("filtered", TEXT, "", StopKind.FILTERED, False, "filtered"),
    ("tool call", TEXT, "", StopKind.TOOL, False, "tool_call"),
    ("stream ended without a stop reason", TEXT, "Hello", StopKind.UNKNOWN, False, "incomplete"),
    ("no stop kind at all", TEXT, "Hello", None, False, "incomplete"),
    ("stop kind wins over content checks", JSON_SCHEMA, "not json", StopKind.TRUNCATED, False, "truncated"),
    ("empty", TEXT, "", OK, False, "empty"),
    ("whitespace only", TEXT, " \n\t ", OK, False, "empty"),
    ("shorter than min_chars", LONG, "  short  ", OK, False, "too_short"),
    ("min_chars 0 allows empty text", LENIENT, "", OK, True, None),
    ("json empty", JSON_ANY, "   ", OK, False, "empty"),
    ("json empty even with min_chars 0", OutputContract(kind="json", min_chars=0), "", OK, False, "empty"),
    ("prose where json was asked", JSON_ANY, "Sure! Here it is.", OK, False, "not_json"),
    ("json with prose around it", JSON_ANY, 'Here: {"a": 1}', OK, False, "not_json"),
    ("two fenced blocks", JSON_ANY, '```json\n{"a": 1}\n```\n```json\n{"b": 2}\n```', OK, False, "not_json"),
    ("NaN is not json", JSON_ANY, '{"a": NaN}', OK, False, "not_json"),
    ("any json value", JSON_ANY, "[1, 2]", OK, True, None),
    ("fenced json", JSON_SCHEMA, f"```json\n{GOOD}\n```", OK, True, None),
    ("bare fence", JSON_SCHEMA, f"```\n{GOOD}\n```", OK, True, None),
    ("schema holds", JSON_SCHEMA, GOOD, OK, True, None),
    (
        "schema: missing property",
        JSON_SCHEMA,
        '{"ticket_id": "TCK-10400"}',
        OK,
        False,
        "schema: $: 'intent' is a required property",
    ),
    (
        "schema: wrong enum",
        JSON_SCHEMA,
        '{"ticket_id": "x", "intent": "cancel"}',
        OK,
        False,
        "schema: $.intent: 'cancel' is not one of ['refund', 'other']",
    ),
    ("schema: wrong type", JSON_SCHEMA, "[]", OK, False, "schema: $: [] is not of type 'object'"),
    ("model holds", JSON_MODEL, '{"ticket_id": "T", "urgency": 2}', OK, True, None),
    ("model: missing field", JSON_MODEL, '{"ticket_id": "T"}', OK, False, "schema: urgency: Field required"),
    (
        "model given as a string",
        JSON_MODEL_STR,
        '{"kind": "timeout", "retryable": "maybe"}',
        OK,
        False,
        "schema: retryable: Input should be a valid boolean, unable to interpret input",
    ),
    ("ids copied", IDS, "Ticket TCK-10400, order 439563.", OK, True, None),
    ("id altered", IDS, "Ticket TCK-10401, order 439563.", OK, False, "missing_id: ticket_id"),
    ("second id missing", IDS, "Ticket TCK-10400.", OK, False, "missing_id: order_id"),
    ("ids escaped inside json", JSON_IDS, json.dumps({"q": 'say "hi"', "c": "Zürich"}), OK, True, None),
    ("id missing from json", JSON_IDS, json.dumps({"q": 'say "hi"'}), OK, False, "missing_id: city"),
]


@pytest.mark.parametrize(("name", "contract", "text", "stop", "ok", "reason"), CASES, ids=[c[0] for c in CASES])
def test_verdicts(name, contract, text, stop, ok, reason):
    verdict = validate(contract, text, stop, INPUTS)
    assert (verdict.ok, verdict.reason) == (ok, reason)


def test_verdict_values():
    assert validate(TEXT, "  Hello.\n", OK, {}) == Verdict(ok=True, value="Hello.")
    assert validate(JSON_SCHEMA, f"```json\n{GOOD}\n```", OK, {}).value == json.loads(GOOD)
    assert validate(TEXT, "", OK, {}) == Verdict(ok=False, value=None, reason="empty")


def test_id_missing_from_inputs_fails_the_answer():
    assert validate(IDS, "TCK-10400", OK, {"ticket_id": "TCK-10400"}).reason == "missing_id: order_id"


def test_long_schema_messages_are_shortened():
    contract = OutputContract(kind="json", json_schema={"type": "object"})
    reason = validate(contract, json.dumps(["x" * 1000]), OK, {}).reason
    assert reason is not None and reason.startswith("schema: $: ") and len(reason) < 220


# ---- custom validators --------------------------------------------------------------------------


@pytest.fixture
def clean_registry() -> Iterator[None]:
    before = set(registered_validators())
    yield
    for name in set(registered_validators()) - before:
        unregister_validator(name)


def test_custom_validators_run_in_order_after_the_builtin_checks(clean_registry):
    seen: list[str] = []

    @register_validator("has_intent")
    def has_intent(value, text, inputs):
        seen.append("has_intent")
        return None if value.get("intent") else "no intent"

    def polite(value, text, inputs):
        seen.append("polite")
        return None if "please" in text else "not polite"

    assert register_validator("polite", polite) is polite
    contract = OutputContract(kind="json", validators=["has_intent", "polite"])

    assert validate(contract, '{"intent": "refund", "x": "please"}', OK, {}).ok
    assert validate(contract, '{"intent": ""}', OK, {}).reason == "validator:has_intent: no intent"
    assert validate(contract, '{"intent": "refund"}', OK, {}).reason == "validator:polite: not polite"
    # A failed built-in check stops before any custom validator runs.
    seen.clear()
    assert validate(contract, "nope", OK, {}).reason == "not_json"
    assert seen == []


def test_validator_receives_value_text_and_inputs(clean_registry):
    calls = []
    register_validator("spy", lambda value, text, inputs: calls.append((value, text, dict(inputs))))
    validate(OutputContract(kind="json", validators=["spy"]), " [1] ", OK, {"k": "v"})
    assert calls == [([1], " [1] ", {"k": "v"})]


def test_raising_validator_is_reported_not_propagated(clean_registry):
    @register_validator("boom")
    def boom(value, text, inputs):
        raise KeyError("intent")

    verdict = validate(OutputContract(validators=["boom"]), "text", OK, {})
    assert verdict == Verdict(ok=False, reason="validator:boom: raised KeyError: 'intent'")


def test_validator_returning_a_non_string_is_invalid(clean_registry):
    register_validator("bool", lambda value, text, inputs: False)
    reason = validate(OutputContract(validators=["bool"]), "text", OK, {}).reason
    assert reason == "validator:bool: returned bool, expected a reason string or None"


def test_unregistered_validator_fails_the_answer():
    reason = validate(OutputContract(validators=["nobody"]), "text", OK, {}).reason
    assert reason == "validator:nobody: not registered"


def test_registry_rejects_a_different_function_under_a_taken_name(clean_registry):
    def first(value, text, inputs):
        return None

    def second(value, text, inputs):
        return "x"

    register_validator("v", first)
    register_validator("v", first)  # same function again (a module re-import): fine
    with pytest.raises(ValueError, match="already registered"):
        register_validator("v", second)
    register_validator("v", second, replace=True)
    assert registered_validators()["v"] is second
    unregister_validator("v")
    unregister_validator("v")  # unknown names are ignored
    assert "v" not in registered_validators()
    with pytest.raises(ValueError):
        register_validator("", first)


# ---- schema models and contract instructions ----------------------------------------------------


def test_resolve_schema_model():
    assert resolve_schema_model(Triage) is Triage
    assert resolve_schema_model("tailrace.engine.outcomes:ProviderError") is ProviderError
    for bad, fragment in [
        ("no_colon", "form 'package.module:ClassName'"),
        ("no_such_module_xyz:Model", "cannot import module"),
        ("tailrace.engine.outcomes:Nope", "has no attribute"),
        ("tailrace.engine.specs:DEFAULT_PROVIDERS", "not a pydantic BaseModel"),
        (dict, "not a pydantic BaseModel"),
    ]:
        with pytest.raises(SpecError, match=fragment):
            resolve_schema_model(bad)


def test_contract_instructions():
    assert contract_instructions(TEXT, INPUTS) == ""
    assert contract_instructions(OutputContract(copy_ids=["ticket_id", "order_id"]), INPUTS) == (
        'Copy these identifiers verbatim into your answer:\n<ids>["TCK-10400","439563"]</ids>'
    )
    text = contract_instructions(OutputContract(kind="json", json_schema=SCHEMA, copy_ids=["city"]), INPUTS)
    schema_part, ids_part = text.split("\n\n")
    assert schema_part.startswith(
        "Respond with a single JSON object that conforms to this JSON Schema, with no other text:\n<schema>"
    )
    assert json.loads(schema_part.split("<schema>")[1].removesuffix("</schema>")) == SCHEMA
    assert " " not in schema_part.split("<schema>")[1]  # compact
    assert ids_part == 'Copy these identifiers verbatim into your answer:\n<ids>["Zürich"]</ids>'


def test_contract_instructions_use_the_models_schema():
    text = contract_instructions(JSON_MODEL_STR, {})
    schema = json.loads(text.split("<schema>")[1].split("</schema>")[0])
    assert schema == ProviderError.model_json_schema()


def test_contract_instructions_for_json_without_schema():
    assert contract_instructions(JSON_ANY, {}) == "Respond with a single JSON value, with no other text."


def test_refusal_phrased_as_content_is_refused_for_text():
    from tailrace.engine.specs import OutputContract as _Contract

    verdict = validate(_Contract(), "I'm sorry, but I can't help with that.", StopKind.COMPLETE, {})
    assert verdict.reason == "refused"
    assert validate(_Contract(), "Sorry for the delay: your refund is on its way.", StopKind.COMPLETE, {}).ok
