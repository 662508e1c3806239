"""Prompt templates: which references a template holds, how they render, and every error."""

from __future__ import annotations

import re

import pytest

from tailrace.engine.errors import TailraceError
from tailrace.engine.templates import TemplateError, TemplateRef, references, render

INPUTS = {"ticket": "TCK-1", "n": 3, "customer": {"name": "Ada"}}
UPSTREAM = {
    "classify": {"intent": "refund", "tags": ["late", "damaged"], "score": 0.5, "ok": True, "none": None},
    "summary": "Short text with {{input.ticket}} inside",
    "items": [{"id": "A"}, {"id": "B"}],
}


def test_references_in_order_with_whitespace_and_paths():
    template = "T {{input.ticket}} {{ steps.classify }} {{\n steps.classify.tags.0 \n}} {{input.ticket}}"
    assert references(template) == [
        TemplateRef("input", "ticket"),
        TemplateRef("steps", "classify"),
        TemplateRef("steps", "classify", ("tags", "0")),
        TemplateRef("input", "ticket"),
    ]


def test_json_braces_are_not_references():
    template = 'Answer as {"a": {"b": [1, {"c": 2}]}} for {{input.ticket}}: {"id": "{{input.ticket}}"}'
    assert references(template) == [TemplateRef("input", "ticket")] * 2
    assert render(template, INPUTS, {}) == 'Answer as {"a": {"b": [1, {"c": 2}]}} for TCK-1: {"id": "TCK-1"}'


def test_ref_str_is_its_source_text():
    assert str(TemplateRef("steps", "classify", ("tags", "0"))) == "steps.classify.tags.0"


RENDER_CASES = [
    ("plain text", "no refs", "no refs"),
    ("input string as-is", "{{input.ticket}}", "TCK-1"),
    ("input number as JSON", "{{input.n}}", "3"),
    ("path into an input object", "{{input.customer.name}}", "Ada"),
    (
        "whole JSON output",
        "{{steps.classify}}",
        '{"intent": "refund", "tags": ["late", "damaged"], "score": 0.5, "ok": true, "none": null}',
    ),
    ("string field raw", "{{steps.classify.intent}}", "refund"),
    ("list field as JSON", "{{steps.classify.tags}}", '["late", "damaged"]'),
    ("list index", "{{steps.classify.tags.1}}", "damaged"),
    ("bool and null as JSON", "{{steps.classify.ok}} {{steps.classify.none}}", "true null"),
    ("index then key", "{{steps.items.1.id}}", "B"),
    ("upstream text is not re-rendered", "[{{steps.summary}}]", "[Short text with {{input.ticket}} inside]"),
    ("spaces inside braces", "{{  input.ticket  }}", "TCK-1"),
]


@pytest.mark.parametrize(("name", "template", "expected"), RENDER_CASES, ids=[c[0] for c in RENDER_CASES])
def test_render(name, template, expected):
    assert render(template, INPUTS, UPSTREAM) == expected


ERROR_CASES = [
    ("missing input field", "{{input.order}}", "no field 'order'"),
    ("missing step output", "{{steps.facts}}", "no output from step 'facts'"),
    ("missing key on a path", "{{steps.classify.urgency}}", "steps.classify has no key 'urgency'"),
    ("index out of range", "{{steps.classify.tags.5}}", "steps.classify.tags is a list of 2; no index '5'"),
    ("non-digit index", "{{steps.items.x}}", "no index 'x'"),
    ("path into a string", "{{steps.summary.x}}", "steps.summary is str, not an object"),
    ("path into a number", "{{steps.classify.score.x}}", "steps.classify.score is float"),
]


@pytest.mark.parametrize(("name", "template", "fragment"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_render_errors_name_what_is_missing(name, template, fragment):
    with pytest.raises(TemplateError, match=re.escape(fragment)):
        render(template, INPUTS, UPSTREAM)


MALFORMED = [
    ("no source", "{{foo}}"),
    ("empty name", "{{input.}}"),
    ("empty braces", "{{}}"),
    ("unknown source", "{{inputs.ticket}}"),
    ("trailing dot", "{{steps.a.}}"),
    ("double dot", "{{steps.a..b}}"),
    ("space inside the reference", "{{input. ticket}}"),
    ("name starting with a digit", "{{steps.1a}}"),
    ("unclosed", "Hello {{input.ticket"),
    ("triple braces", "{{{input.ticket}}}"),
]


@pytest.mark.parametrize(("name", "template"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_references_are_errors(name, template):
    with pytest.raises(TemplateError, match=r"malformed|unclosed"):
        references(template)
    with pytest.raises(TemplateError):
        render(template, INPUTS, UPSTREAM)


def test_template_error_is_a_tailrace_error():
    assert issubclass(TemplateError, TailraceError)
