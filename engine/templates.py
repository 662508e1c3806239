"""Prompt templates: find and fill `{{input.FIELD}}` and `{{steps.STEP_ID[.path]}}` references.

Double braces keep JSON in prompts safe: `{{` never occurs in valid JSON, so every `{{` opens a
reference, and a `{{` with no closing `}}` or with anything but a well-formed reference inside is an
error rather than literal text (a silent typo would otherwise reach the model as-is).

Rendering is one pass over the template: a substituted value is never scanned again, so an upstream
output that itself contains `{{...}}` is copied verbatim. Strings are inserted as they are; any other
value (a JSON step's parsed output, a number, a list) is inserted as `json.dumps` of it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tailrace.engine._bounds import encodable
from tailrace.engine.errors import TailraceError

Source = Literal["input", "steps"]

_OPEN, _CLOSE = "{{", "}}"
_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_SEGMENT = r"[A-Za-z0-9_-]+"
_REF = re.compile(rf"(?P<source>input|steps)\.(?P<name>{_NAME})(?P<path>(?:\.{_SEGMENT})*)")
_SNIPPET_CHARS = 40


class TemplateError(TailraceError):
    """A template is malformed, or names an input field, step or path that is not there."""


@dataclass(frozen=True)
class TemplateRef:
    """One `{{...}}` reference: `source` is 'input' or 'steps', `path` the keys after the name."""

    source: Source
    name: str
    path: tuple[str, ...] = ()

    def __str__(self) -> str:
        return ".".join((self.source, self.name, *self.path))


def references(template: str) -> list[TemplateRef]:
    """Every reference in `template`, in order of appearance (repeats included).

    Raises `TemplateError` for the first malformed `{{...}}`.
    """
    return [ref for _, _, ref in _parsed(template)]


def render(template: str, inputs: Mapping[str, Any], upstream: Mapping[str, Any]) -> str:
    """Fill every reference from the run's `inputs` and the `upstream` step outputs (by step id).

    Raises `TemplateError` when a value is missing, or holds text no request can carry (a lone
    surrogate cannot be encoded as UTF-8): the call is never sent.
    """
    out: list[str] = []
    pos = 0
    for start, end, ref in _parsed(template):
        out.append(template[pos:start])
        text = _format(_lookup(ref, inputs, upstream))
        if not encodable(text):
            raise TemplateError(
                f"{{{{{ref}}}}}: the value holds text that cannot be encoded as UTF-8 (a lone surrogate)"
            )
        out.append(text)
        pos = end
    out.append(template[pos:])
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def _parsed(template: str) -> tuple[tuple[int, int, TemplateRef], ...]:
    # A workflow has a few templates rendered for every run: parse each once.
    return tuple(_scan(template))


def _scan(template: str) -> Iterator[tuple[int, int, TemplateRef]]:
    """Yield (start, end, ref) for each `{{...}}` in `template`."""
    pos = 0
    while (start := template.find(_OPEN, pos)) != -1:
        close = template.find(_CLOSE, start + len(_OPEN))
        if close == -1:
            raise TemplateError(f"unclosed '{{{{' at {_snippet(template, start)}")
        end = close + len(_CLOSE)
        yield start, end, _parse(template[start + len(_OPEN) : close], template[start:end])
        pos = end


def _parse(inner: str, whole: str) -> TemplateRef:
    match = _REF.fullmatch(inner.strip())
    if match is None:
        raise TemplateError(
            f"malformed reference {whole!r}: expected {{{{input.FIELD}}}} or {{{{steps.STEP_ID[.path]}}}}"
        )
    path = tuple(match["path"].split(".")[1:]) if match["path"] else ()
    source: Source = "input" if match["source"] == "input" else "steps"
    return TemplateRef(source, match["name"], path)


def _lookup(ref: TemplateRef, inputs: Mapping[str, Any], upstream: Mapping[str, Any]) -> Any:
    if ref.source == "input":
        if ref.name not in inputs:
            raise TemplateError(f"{{{{{ref}}}}}: the run's input has no field {ref.name!r}")
        value = inputs[ref.name]
    else:
        if ref.name not in upstream:
            raise TemplateError(f"{{{{{ref}}}}}: no output from step {ref.name!r}")
        value = upstream[ref.name]
    for depth, key in enumerate(ref.path):
        value = _step_into(value, key, ref, depth)
    return value


def _step_into(value: Any, key: str, ref: TemplateRef, depth: int) -> Any:
    where = ".".join((ref.source, ref.name, *ref.path[:depth]))
    if isinstance(value, Mapping):
        if key in value:
            return value[key]
        raise TemplateError(f"{{{{{ref}}}}}: {where} has no key {key!r}")
    if isinstance(value, list):
        # Digit segments index lists, so `steps.x.items.0.id` reaches into arrays.
        if key.isdigit() and int(key) < len(value):
            return value[int(key)]
        raise TemplateError(f"{{{{{ref}}}}}: {where} is a list of {len(value)}; no index {key!r}")
    raise TemplateError(f"{{{{{ref}}}}}: {where} is {type(value).__name__}, not an object; no key {key!r}")


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON, or nested too deep to write
        raise TemplateError(f"the value cannot be written as JSON ({type(exc).__name__})") from None


def _snippet(template: str, start: int) -> str:
    text = template[start : start + _SNIPPET_CHARS]
    return repr(text + ("..." if len(template) - start > _SNIPPET_CHARS else ""))
