"""Attempt traces: every attempt of every run as one JSONL line, secrets always redacted, prompt text
redacted when configured.

A trace file holds three kinds of lines, in order of writing (a resumed batch appends):
`{"kind": "batch", "workflow": {...}, "settings": {...}}` once per batch (the spec, so replay needs
nothing else, and the run options, tail control and budget the batch ran with, for `tailrace whatif`),
`{"kind": "run", ...}` per finished run (inputs, outcome, times), and `{"kind": "attempt", ...}` per
attempt: run, step, model, role, times, TTFT, tokens, cost, outcome, why it lost, and the exact
request it sent (rendered prompt, system text, sampling parameters) for `tailrace replay`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict

from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, RunOutcome
from tailrace.engine.specs import WorkflowSpec

REDACTED = "[REDACTED]"

# Shapes of credentials that must never reach a trace, whatever text they hide in.
_SECRET_PATTERNS = [
    re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),  # OpenAI / Anthropic keys
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-~+/=]{8,}"),  # Authorization headers
    re.compile(r"(?i)\b(api[_-]?key|password|passwd|secret|token)(\"?\s*[:=]\s*\"?)[^\s\"',;]{4,}"),
    re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://[^:/@\s]*:)[^@\s]+(@)"),  # user:password@ in URLs
]
_SECRET_ENV = re.compile(r"(?i)(api_?key|password|secret|token)")


class TraceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    redact_prompts: bool = False  # prompt, system text and run inputs become "[REDACTED n chars]"


def default_trace_path(results: str | Path) -> Path:
    """`results.jsonl` -> `results.trace.jsonl`, next to it."""
    p = Path(results)
    return p.with_name(p.name.removesuffix(".jsonl") + ".trace.jsonl")


class Redactor:
    """Scrubs credentials (known key shapes and the values of secret-looking environment variables)
    from every string, and prompt text too when asked."""

    def __init__(self, redact_prompts: bool = False, secrets: list[str] | None = None) -> None:
        self.redact_prompts = redact_prompts
        values = (
            secrets
            if secrets is not None
            else [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8]
        )
        self._literals = sorted(set(values), key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for literal in self._literals:
            text = text.replace(literal, REDACTED)
        text = _SECRET_PATTERNS[0].sub(REDACTED, text)
        text = _SECRET_PATTERNS[1].sub("Bearer " + REDACTED, text)
        text = _SECRET_PATTERNS[2].sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
        return _SECRET_PATTERNS[3].sub(lambda m: m.group(1) + REDACTED + m.group(2), text)

    def deep(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self.deep(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.deep(v) for v in value]
        return value

    def prompt(self, value: Any) -> Any:
        """Prompt material (rendered prompts, system text, input records)."""
        if not self.redact_prompts or value is None:
            return self.deep(value)
        if isinstance(value, dict):
            return {k: self.prompt(v) for k, v in value.items()}
        text = value if isinstance(value, str) else json.dumps(value)
        return f"[REDACTED {len(text)} chars]"


def why_lost(record: AttemptRecord, won: bool) -> str | None:
    """None for the attempt whose answer was used; else one short reason."""
    if won:
        return None
    if record.outcome == AttemptOutcome.CANCELLED:
        return record.cancel_reason.value if record.cancel_reason else "cancelled"
    if record.outcome == AttemptOutcome.INVALID:
        return f"invalid: {record.invalid_reason}"
    if record.outcome == AttemptOutcome.ERROR:
        return f"error: {record.error.kind.value}" if record.error else "error"
    return "valid_unused"  # a valid answer that was not used (its run failed, or another won first)


def winners(outcome: RunOutcome) -> set[tuple[str, int]]:
    """(step, attempt) of each step's winning answer: its first valid attempt."""
    first: dict[str, AttemptRecord] = {}
    for a in outcome.attempts:
        if a.outcome == AttemptOutcome.VALID and (a.step_id not in first or a.ended_at < first[a.step_id].ended_at):
            first[a.step_id] = a
    # In a failed run, a step that succeeded still won its race (its answer fed its dependants).
    return {(s, a.attempt) for s, a in first.items()}


def attempt_line(record: AttemptRecord, won: bool, redactor: Redactor) -> dict[str, Any]:
    line = record.model_dump(mode="json", exclude={"request", "rate_limit"})
    line = {"kind": "attempt", **redactor.deep(line), "won": won, "why_lost": why_lost(record, won)}
    if record.request is not None:
        request = record.request.model_dump(mode="json")
        request["prompt"] = redactor.prompt(request["prompt"])
        request["system"] = redactor.prompt(request["system"])
        line["request"] = request
    return line


def run_line(outcome: RunOutcome, inputs: Mapping[str, Any] | None, redactor: Redactor) -> dict[str, Any]:
    fields = outcome.model_dump(mode="json", exclude={"attempts", "outputs"})
    return {
        "kind": "run",
        **redactor.deep(fields),
        "inputs": redactor.prompt(dict(inputs or {})),
        "attempts": len(outcome.attempts),
    }


def workflow_json(workflow: WorkflowSpec) -> dict[str, Any]:
    """The spec as JSON; a pydantic `schema_model` class is written as its "module:Class" path."""

    def fallback(value: Any) -> Any:
        if isinstance(value, type):
            return f"{value.__module__}:{value.__qualname__}"
        raise TypeError(type(value).__name__)

    return json.loads(json.dumps(workflow.model_dump(mode="python"), default=fallback))


class TraceWriter:
    """Appends trace lines and flushes after each run, so an interrupted batch keeps what finished."""

    def __init__(
        self,
        config: TraceConfig,
        workflow: WorkflowSpec,
        redactor: Redactor | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.path = Path(config.path)
        self.redactor = redactor or Redactor(config.redact_prompts)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")
        self._write(
            {
                "kind": "batch",
                "workflow": self.redactor.deep(workflow_json(workflow)),
                "redact_prompts": config.redact_prompts,
                **({"settings": self.redactor.deep(dict(settings))} if settings is not None else {}),
            }
        )

    def write(self, outcome: RunOutcome, inputs: Mapping[str, Any] | None = None) -> None:
        used = winners(outcome)
        self._write(run_line(outcome, inputs, self.redactor))
        for record in outcome.attempts:
            self._write(attempt_line(record, (record.step_id, record.attempt) in used, self.redactor))
        if self._file is not None:
            self._file.flush()

    def _write(self, line: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_trace(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every well-formed line of a trace (a line cut by a crash is skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue
