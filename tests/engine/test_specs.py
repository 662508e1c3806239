"""Workflow specs: a table of bad specs and the field each error names; loading YAML, JSON and JSONL."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from tailrace.engine.errors import InputError, SpecErrors
from tailrace.engine.loading import check_inputs, load_inputs, load_workflow, workflow_from_dict
from tailrace.engine.spec_checks import check_schema_models, check_validators_registered
from tailrace.engine.specs import WorkflowSpec
from tailrace.engine.validation import register_validator, unregister_validator

FAST = {"provider": "openai", "model": "gpt-4o-mini", "max_tokens": 200}
SLOW = {"provider": "anthropic", "model": "claude-sonnet-4-5", "max_tokens": 400}

BASE: dict[str, Any] = {
    "name": "triage",
    "inputs": ["ticket", "message"],
    "steps": [
        {
            "id": "classify",
            "prompt": "Classify {{input.ticket}}: {{input.message}}",
            "models": [{**SLOW}, {**FAST}],
            "output": {"kind": "json", "json_schema": {"type": "object"}, "copy_ids": ["ticket"]},
        },
        {
            "id": "summarize",
            "depends_on": ["classify"],
            "prompt": "Summarize a {{ steps.classify.intent }} ticket",
            "models": [{**SLOW}, {**FAST}],
        },
        {
            "id": "reply",
            "depends_on": ["summarize"],
            "system": "Be brief.",
            "prompt": "Reply using {{steps.summarize}} and {{steps.classify}}",
            "models": [{**FAST}],
        },
    ],
}

CLASSIFY, SUMMARIZE, REPLY = 0, 1, 2
DELETE = object()


def patched(*changes: tuple[tuple[str | int, ...], Any]) -> dict[str, Any]:
    """A copy of BASE with each (path, value) set, or the key removed when value is DELETE.

    BASE holds no shared sub-dicts: deepcopy keeps sharing, so one change would hit every alias.
    """
    data = copy.deepcopy(BASE)
    for path, value in changes:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return data


def cycle_steps() -> list[dict[str, Any]]:
    return [
        {"id": "a", "prompt": "x", "depends_on": ["c"], "models": [FAST]},
        {"id": "b", "prompt": "x", "depends_on": ["a"], "models": [FAST]},
        {"id": "c", "prompt": "x", "depends_on": ["b"], "models": [FAST]},
    ]


S, M = "steps", "models"
CASES = [
    # (name, changes, expected field path, message fragment)
    # -- cross-field checks (engine.spec_checks)
    (
        "duplicate step id",
        [((S, REPLY, "id"), "summarize")],
        "steps[summarize].id",
        "duplicate step id 'summarize' (steps 1 and 2",
    ),
    (
        "unknown dependency",
        [((S, REPLY, "depends_on"), ["summarize", "sumarize"])],
        "steps[reply].depends_on[1]",
        "unknown step 'sumarize'; steps are: classify, summarize, reply",
    ),
    (
        "self dependency",
        [((S, REPLY, "depends_on"), ["summarize", "reply"])],
        "steps[reply].depends_on[1]",
        "cannot depend on itself",
    ),
    (
        "dependency listed twice",
        [((S, REPLY, "depends_on"), ["summarize", "summarize"])],
        "steps[reply].depends_on[1]",
        "listed twice",
    ),
    ("cycle", [((S,), cycle_steps())], "steps[a].depends_on[0]", "cycle: a -> b -> c -> a"),
    (
        "two-step cycle",
        [((S, CLASSIFY, "depends_on"), ["reply"])],
        "steps[classify].depends_on[0]",
        "cycle: classify -> summarize -> reply -> classify",
    ),
    (
        "prompt uses an unknown input",
        [((S, SUMMARIZE, "prompt"), "{{input.tickt}}")],
        "steps[summarize].prompt",
        "{{input.tickt}}: unknown input field 'tickt'; declared inputs: ticket, message",
    ),
    (
        "prompt uses an input when none are declared",
        [(("inputs",), []), ((S, CLASSIFY, "output", "copy_ids"), [])],
        "steps[classify].prompt",
        "declared inputs: (none)",
    ),
    (
        "prompt uses a step outside depends_on",
        [((S, SUMMARIZE, "depends_on"), []), ((S, REPLY, "depends_on"), ["summarize"])],
        "steps[summarize].prompt",
        "step 'classify' is not in this step's depends_on",
    ),
    (
        "prompt uses a later step",
        [((S, CLASSIFY, "prompt"), "{{steps.reply}}")],
        "steps[classify].prompt",
        "step 'reply' is not in this step's depends_on",
    ),
    (
        "prompt uses an unknown step",
        [((S, REPLY, "prompt"), "{{steps.nope}}")],
        "steps[reply].prompt",
        "unknown step 'nope'",
    ),
    (
        "prompt uses its own step",
        [((S, REPLY, "prompt"), "{{steps.reply}}")],
        "steps[reply].prompt",
        "cannot use its own output",
    ),
    (
        "path into a text output",
        [((S, REPLY, "prompt"), "{{steps.summarize.x}}")],
        "steps[reply].prompt",
        "step 'summarize' has a text output; a path into it needs output.kind: json",
    ),
    (
        "malformed reference",
        [((S, REPLY, "system"), "Be {{brief}}")],
        "steps[reply].system",
        "malformed reference '{{brief}}'",
    ),
    ("empty reference name", [((S, REPLY, "prompt"), "{{input.}}")], "steps[reply].prompt", "malformed"),
    ("unclosed reference", [((S, REPLY, "prompt"), "x {{input.ticket")], "steps[reply].prompt", "unclosed"),
    (
        "model prompt variant",
        [((S, SUMMARIZE, M, 1, "prompt"), "{{input.nope}}")],
        "steps[summarize].models[1].prompt",
        "unknown input field 'nope'",
    ),
    (
        "model system variant",
        [((S, SUMMARIZE, M, 0, "system"), "{{steps.reply}}")],
        "steps[summarize].models[0].system",
        "not in this step's depends_on",
    ),
    (
        "unknown provider",
        [((S, SUMMARIZE, M, 1, "provider"), "opnai")],
        "steps[summarize].models[1].provider",
        "unknown provider 'opnai'; known providers: openai, anthropic",
    ),
    (
        "unknown provider lists custom ones",
        [
            (("providers",), {"local": {"kind": "openai", "base_url": "http://localhost:1"}}),
            ((S, REPLY, M, 0, "provider"), "remote"),
        ],
        "steps[reply].models[0].provider",
        "known providers: openai, anthropic, local",
    ),
    ("empty model list", [((S, REPLY, M), [])], "steps[reply].models", "at least one model"),
    (
        "copy_ids names an unknown input",
        [((S, CLASSIFY, "output", "copy_ids"), ["ticket", "order"])],
        "steps[classify].output.copy_ids[1]",
        "unknown input field 'order'",
    ),
    (
        "invalid JSON Schema",
        [((S, CLASSIFY, "output", "json_schema"), {"type": "objekt"})],
        "steps[classify].output.json_schema",
        "invalid JSON Schema",
    ),
    (
        "invalid nested JSON Schema",
        [((S, CLASSIFY, "output", "json_schema"), {"type": "object", "properties": {"a": {"minLength": -1}}})],
        "steps[classify].output.json_schema",
        "at properties/a/minLength",
    ),
    (
        "JSON Schema on a text output",
        [((S, REPLY, "output"), {"json_schema": {"type": "object"}})],
        "steps[reply].output.json_schema",
        "needs output.kind: json",
    ),
    (
        "schema model on a text output",
        [((S, REPLY, "output"), {"schema_model": "tailrace.engine.outcomes:ProviderError"})],
        "steps[reply].output.schema_model",
        "needs output.kind: json",
    ),
    (
        "schema model without a colon",
        [((S, CLASSIFY, "output", "schema_model"), "tailrace.engine.outcomes.StopKind")],
        "steps[classify].output.schema_model",
        "'package.module:ClassName'",
    ),
    ("input listed twice", [(("inputs",), ["ticket", "message", "ticket"])], "inputs[2]", "listed twice"),
    # -- field checks (pydantic), with step ids in the path
    ("unknown top-level key", [(("deadline_s",), 5)], "deadline_s", "unknown key"),
    (
        "unknown step key",
        [((S, SUMMARIZE, "modles"), [])],
        "steps[summarize].modles",
        "unknown key (did you mean 'models'?)",
    ),
    (
        "unknown model key",
        [((S, SUMMARIZE, M, 0, "max_token"), 5)],
        "steps[summarize].models[0].max_token",
        "unknown key (did you mean 'max_tokens'?)",
    ),
    ("unknown output key", [((S, CLASSIFY, "output", "schema"), {})], "steps[classify].output.schema", "unknown key"),
    ("unknown defaults key", [(("defaults",), {"deadline": 3})], "defaults.deadline", "unknown key"),
    (
        "unknown provider key",
        [(("providers",), {"p": {"kind": "openai", "url": "x"}})],
        "providers.p.url",
        "unknown key",
    ),
    (
        "zero deadline",
        [(("defaults",), {"deadline_s": 0})],
        "defaults.deadline_s",
        "Input should be greater than 0 (got 0)",
    ),
    ("negative deadline", [(("defaults",), {"deadline_s": -5})], "defaults.deadline_s", "greater than 0"),
    ("zero cost cap", [(("defaults",), {"max_cost_usd": 0})], "defaults.max_cost_usd", "greater than 0"),
    ("negative cost cap", [(("defaults",), {"max_cost_usd": -0.01})], "defaults.max_cost_usd", "greater than 0"),
    (
        "zero max_tokens",
        [((S, SUMMARIZE, M, 1, "max_tokens"), 0)],
        "steps[summarize].models[1].max_tokens",
        "greater than 0",
    ),
    (
        "negative max_tokens",
        [((S, REPLY, M, 0, "max_tokens"), -1)],
        "steps[reply].models[0].max_tokens",
        "greater than 0",
    ),
    ("missing models", [((S, REPLY, M), DELETE)], "steps[reply].models", "missing required key"),
    ("missing name", [(("name",), DELETE)], "name", "missing required key"),
    ("bad step id", [((S, REPLY, "id"), "2nd reply")], "steps[2nd reply].id", "should match pattern"),
    ("wrong type", [((S, REPLY, "depends_on"), "summarize")], "steps[reply].depends_on", "valid list"),
    ("bad output kind", [((S, CLASSIFY, "output", "kind"), "xml")], "steps[classify].output.kind", "'text' or 'json'"),
    ("step that is not a mapping", [((S, REPLY), "reply")], "steps[2]", "valid dictionary"),
]


@pytest.mark.parametrize(("name", "changes", "field", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_spec_error_table(name, changes, field, fragment):
    with pytest.raises(SpecErrors) as caught:
        workflow_from_dict(patched(*changes))
    found = {e.field: e.message for e in caught.value.errors}
    assert field in found, f"no error at {field}; got {found}"
    assert fragment in found[field]


def test_the_base_spec_is_valid():
    spec = workflow_from_dict(BASE)
    assert [s.id for s in spec.steps] == ["classify", "summarize", "reply"]


def test_every_problem_is_reported_at_once():
    data = patched(
        ((S, REPLY, "depends_on"), ["ghost"]),
        ((S, REPLY, M, 0, "provider"), "nobody"),
        ((S, SUMMARIZE, "prompt"), "{{input.nope}}"),
    )
    with pytest.raises(SpecErrors) as caught:
        workflow_from_dict(data)
    assert [e.field for e in caught.value.errors] == [
        "steps[reply].depends_on[0]",
        "steps[summarize].prompt",
        "steps[reply].models[0].provider",
        # Neither {{steps.summarize}} nor {{steps.classify}} is upstream of reply any more.
        "steps[reply].prompt",
        "steps[reply].prompt",
    ]


def test_cross_field_errors_pass_through_pydantic_unchanged():
    # SpecErrors is not a ValueError, so model_validate raises it as-is, not as a ValidationError.
    with pytest.raises(SpecErrors):
        WorkflowSpec.model_validate(patched(((S, REPLY, "depends_on"), ["ghost"])))
    with pytest.raises(pydantic.ValidationError):
        WorkflowSpec.model_validate(patched(((S, REPLY, "extra"), 1)))


def test_schema_model_accepts_a_class_from_python():
    class Answer(pydantic.BaseModel):
        intent: str

    ok = patched(((S, CLASSIFY, "output"), {"kind": "json", "schema_model": Answer}))
    assert workflow_from_dict(ok).steps[0].output.schema_model is Answer
    with pytest.raises(SpecErrors, match="not a pydantic BaseModel subclass"):
        workflow_from_dict(patched(((S, CLASSIFY, "output"), {"kind": "json", "schema_model": dict})))


SCHEMA_MODEL_AT_RUN_START = [
    ("no_such_pkg.mod:Model", "cannot import module 'no_such_pkg.mod'"),
    ("tailrace.engine.outcomes:Nope", "has no attribute 'Nope'"),
    ("tailrace.engine.outcomes:StopKind", "not a pydantic BaseModel subclass"),
]


@pytest.mark.parametrize(("ref", "fragment"), SCHEMA_MODEL_AT_RUN_START)
def test_schema_models_named_by_path_are_resolved_at_run_start_not_at_load(ref, fragment, monkeypatch):
    monkeypatch.setenv("TAILRACE_SCHEMA_MODULES", "no_such_pkg")
    spec = workflow_from_dict(patched(((S, CLASSIFY, "output", "schema_model"), ref)))  # loading imports nothing
    with pytest.raises(SpecErrors) as caught:
        check_schema_models(spec)
    [error] = caught.value.errors
    assert error.field == "steps[classify].output.schema_model"
    assert fragment in error.message


def test_loading_a_spec_never_imports_the_schema_model_module(tmp_path, monkeypatch):
    (tmp_path / "evil_schema_mod.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('ran').write_text('x')\n"
        "import pydantic\nclass M(pydantic.BaseModel):\n    a: int\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = workflow_from_dict(patched(((S, CLASSIFY, "output", "schema_model"), "evil_schema_mod:M")))
    assert not (tmp_path / "ran").exists()
    # Not imported anywhere and not listed: refused at run start too, saying how to allow it.
    with pytest.raises(SpecErrors, match="TAILRACE_SCHEMA_MODULES"):
        check_schema_models(spec)
    assert not (tmp_path / "ran").exists()
    monkeypatch.setenv("TAILRACE_SCHEMA_MODULES", "other, evil_schema_mod")
    check_schema_models(spec)  # allowed: now it is imported
    assert (tmp_path / "ran").exists()


def test_templates_may_use_any_ancestor():
    # reply depends on summarize, which depends on classify: classify's output is usable in reply.
    assert "{{steps.classify}}" in BASE["steps"][REPLY]["prompt"]
    workflow_from_dict(BASE)


def test_validators_are_checked_at_run_start():
    data = patched(((S, CLASSIFY, "output", "validators"), ["has_intent"]))
    spec = workflow_from_dict(data)  # loading does not need the validator yet
    with pytest.raises(SpecErrors) as caught:
        check_validators_registered(spec)
    [error] = caught.value.errors
    assert error.field == "steps[classify].output.validators[0]"
    assert "validator 'has_intent' is not registered" in error.message
    register_validator("has_intent", lambda value, text, inputs: None)
    try:
        check_validators_registered(spec)
    finally:
        unregister_validator("has_intent")


# ---- loading files ------------------------------------------------------------------------------


def test_yaml_and_json_give_equal_specs(tmp_path):
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
    (tmp_path / "wf.yml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "wf.json").write_text(json.dumps(BASE, indent=2))
    specs = [load_workflow(tmp_path / name) for name in ("wf.yaml", "wf.yml", "wf.json")]
    assert specs[0] == specs[1] == specs[2] == workflow_from_dict(BASE)
    assert load_workflow(str(tmp_path / "wf.json")) == specs[0]


def test_yaml_anchors_are_shared(tmp_path):
    text = """
name: w
steps:
  - id: a
    prompt: x
    models: &ladder
      - {provider: openai, model: gpt-4.1, max_tokens: 100}
      - {provider: anthropic, model: claude-haiku-4-5, max_tokens: 100}
  - {id: b, prompt: y, depends_on: [a], models: *ladder}
"""
    (tmp_path / "wf.yaml").write_text(text)
    spec = load_workflow(tmp_path / "wf.yaml")
    assert spec.steps[0].models == spec.steps[1].models


FILE_ERRORS = [
    ("missing.yaml", None, "missing.yaml", "file not found"),
    ("wf.toml", "name = 'x'", "wf.toml", "unsupported file type '.toml'"),
    ("bad.yaml", "name: w\nsteps:\n  - id: a\n   prompt: [unclosed\n", "bad.yaml:4", "YAML syntax error"),
    ("bad.json", '{\n  "name": "w",\n  "steps": [,]\n}', "bad.json:3", "JSON syntax error"),
    ("list.yaml", "- a\n- b\n", "list.yaml", "top level must be a mapping"),
    ("empty.yaml", "", "empty.yaml", "got empty"),
    ("string.json", '"hello"', "string.json", "got a str"),
]


@pytest.mark.parametrize(("name", "content", "where", "fragment"), FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_file_errors_name_the_file(tmp_path, name, content, where, fragment):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(SpecErrors) as caught:
        load_workflow(tmp_path / name)
    [error] = caught.value.errors
    assert error.field == str(tmp_path / where)
    assert fragment in error.message


def test_spec_errors_from_a_file_carry_the_file_name(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(patched(((S, REPLY, M), []))))
    with pytest.raises(SpecErrors) as caught:
        load_workflow(path)
    assert caught.value.__notes__ == [f"in {path}"]


def test_the_example_workflow_loads():
    root = Path(__file__).resolve().parents[2] / "examples" / "support_triage"
    if not root.exists():
        pytest.skip("example not present")
    spec = load_workflow(root / "workflow.yaml")
    records = list(load_inputs(root / "inputs.jsonl"))
    for line, record in records:
        check_inputs(spec, record, line)
    assert records


# ---- batches of inputs --------------------------------------------------------------------------


def test_load_inputs_skips_blank_lines_and_numbers_lines(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"ticket": "T1"}\n\n   \n{"ticket": "T2", "message": "hi"}\n')
    assert list(load_inputs(path)) == [(1, {"ticket": "T1"}), (4, {"ticket": "T2", "message": "hi"})]


INPUT_ERRORS = [
    ("malformed line", '{"a": 1}\n{"a": \n', ":2: not valid JSON"),
    ("array line", '{"a": 1}\n\n[1, 2]\n', ":3: expected a JSON object, got an array"),
    ("string line", '"x"\n', ":1: expected a JSON object, got a string"),
    ("null line", "null\n", ":1: expected a JSON object, got null"),
]


@pytest.mark.parametrize(("name", "content", "fragment"), INPUT_ERRORS, ids=[c[0] for c in INPUT_ERRORS])
def test_load_inputs_errors_name_file_and_line(tmp_path, name, content, fragment):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=str(path).replace("\\", "\\\\") + fragment.replace("[", r"\[")):
        list(load_inputs(path))


def test_load_inputs_is_lazy(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"n": 1}\nnot json\n')
    records = load_inputs(path)
    assert next(records) == (1, {"n": 1})  # the bad line is not read yet
    with pytest.raises(InputError, match=":2:"):
        next(records)


def test_load_inputs_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        list(load_inputs(tmp_path / "nope.jsonl"))


def test_check_inputs():
    spec = workflow_from_dict(BASE)
    check_inputs(spec, {"ticket": "T", "message": "m", "extra": 1}, 1)
    with pytest.raises(InputError, match="line 7: missing input field"):
        check_inputs(spec, {"ticket": "T"}, 7)
    with pytest.raises(InputError, match=r"in.jsonl:7: missing input field\(s\): ticket, message"):
        check_inputs(spec, {}, 7, source="in.jsonl")
