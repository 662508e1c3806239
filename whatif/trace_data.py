"""A trace written by `tailrace run` (`<results>.trace.jsonl`), read into typed records for the what-if.

The trace holds the workflow spec and the settings the batch ran with (batch lines), one line per
finished run (inputs, outcome, times) and one per attempt (model, role, times, TTFT, tokens, outcome,
why it lost). A line cut by a crash is skipped; anything else that does not parse is an `InputError`
naming the file, line and field. Traces written before settings were recorded replay with the
defaults, and `TraceData.notes` says so.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from tailrace.engine.errors import InputError, SpecErrors
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, FailureReason
from tailrace.engine.specs import HedgeConfig, RunOptions, WorkflowSpec
from tailrace.policies.budget_config import BudgetConfig
from tailrace.policies.hedging import TailTuning

TRACE_SUFFIX = ".trace.jsonl"


class TraceRun(BaseModel):
    """One run line."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    workflow: str = ""
    tenant: str = "default"
    delivered: bool
    failure: FailureReason | None = None
    failed_step: str | None = None
    started_at: float
    ended_at: float
    deadline_at: float
    latency_s: float
    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    degraded_steps: dict[str, str] = {}
    inputs: dict[str, Any] = {}
    segment: int = 0  # which batch of the trace (a resumed batch appends another), set when read

    @property
    def on_time(self) -> bool:
        return self.delivered and self.ended_at <= self.deadline_at

    @property
    def deadline_s(self) -> float:
        return self.deadline_at - self.started_at


class TraceAttempt(AttemptRecord):
    """One attempt line: the attempt record, and whether its answer was the one its step used."""

    won: bool = False
    why_lost: str | None = None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class TraceSettings(BaseModel):
    """What the batch ran with (the defaults where the trace does not say)."""

    model_config = ConfigDict(extra="ignore")

    options: RunOptions | None = None
    hedge: HedgeConfig = HedgeConfig()
    tuning: TailTuning = TailTuning()
    budget: BudgetConfig | None = None
    executors: int = 2
    max_in_flight: int | None = None
    grace_s: float = 0.25

    @pydantic.field_validator("options", "hedge", "tuning", "budget", mode="before")
    @classmethod
    def _known_fields_only(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        # A trace outlives the code that wrote it: a setting this version no longer has is dropped
        # (its default applies), not an error.
        annotation = cls.model_fields[info.field_name or ""].annotation
        model = next((t for t in getattr(annotation, "__args__", (annotation,)) if _is_model(t)), None)
        return _known(model, value) if model is not None else value


@dataclass
class TraceData:
    path: Path
    workflow: WorkflowSpec
    settings: TraceSettings
    runs: list[TraceRun]
    attempts: list[TraceAttempt]
    batches: int = 1
    notes: list[str] = field(default_factory=list)
    _by_run: dict[str, list[TraceAttempt]] | None = None
    _shifts: dict[int, float] | None = None
    _segment_of: dict[str, int] | None = None

    @property
    def start(self) -> float:
        """Epoch seconds of the first run's start: time 0 of the trace."""
        return min(r.started_at for r in self.runs)

    def _segment_shifts(self) -> dict[int, float]:
        """Per batch of the trace, what to subtract from its epoch times so the batches follow each
        other with no idle time between them (a batch resumed an hour later continues where it stopped)."""
        if self._shifts is None:
            spans: dict[int, list[float]] = {}
            for r in self.runs:
                lo, hi = spans.setdefault(r.segment, [r.started_at, r.ended_at])
                spans[r.segment] = [min(lo, r.started_at), max(hi, r.ended_at)]
            shifts, at = {}, 0.0
            for segment, (lo, hi) in sorted(spans.items(), key=lambda kv: kv[1][0]):
                shifts[segment] = lo - at
                at += hi - lo
            self._shifts = shifts
        return self._shifts

    def segments(self) -> list[tuple[list[TraceRun], float]]:
        """The trace's batches in order, each with its runs (in the order they started) and the idle
        time before it."""
        by_segment: dict[int, list[TraceRun]] = defaultdict(list)
        for r in self.runs:
            by_segment[r.segment].append(r)
        ordered = sorted(by_segment.values(), key=lambda runs: min(r.started_at for r in runs))
        out, end = [], None
        for runs in ordered:
            runs.sort(key=lambda r: r.started_at)
            start = runs[0].started_at
            out.append((runs, 0.0 if end is None else max(0.0, start - end)))
            end = max(r.ended_at for r in runs)
        return out

    def elapsed(self, epoch_s: float, run_id: str) -> float:
        """Seconds of the trace's busy time at `epoch_s` (a time of run `run_id`): idle gaps between its
        batches left out."""
        if self._segment_of is None:
            self._segment_of = {r.run_id: r.segment for r in self.runs}
        return epoch_s - self._segment_shifts()[self._segment_of.get(run_id, 0)]

    @property
    def span_s(self) -> float:
        """The trace's busy time: its batches' spans added up."""
        shifts = self._segment_shifts()
        return max(1e-6, max(r.ended_at - shifts[r.segment] for r in self.runs))

    def attempts_of(self, run_id: str) -> list[TraceAttempt]:
        if self._by_run is None:
            by_run: dict[str, list[TraceAttempt]] = defaultdict(list)
            for a in self.attempts:
                by_run[a.run_id].append(a)
            self._by_run = dict(by_run)
        return self._by_run.get(run_id, [])

    def options(self) -> RunOptions:
        """The run options the batch used: recorded, else the workflow's defaults with the deadline the
        runs carried."""
        if self.settings.options is not None:
            return self.settings.options
        deadline = statistics.median(r.deadline_s for r in self.runs)
        return self.workflow.defaults.model_copy(update={"deadline_s": round(deadline, 6)})

    def concurrency(self) -> int:
        """Runs in flight at once: recorded, else the most that overlapped in the trace."""
        if self.settings.max_in_flight is not None:
            return min(self.settings.max_in_flight, len(self.runs))
        events = sorted([(r.started_at, 1) for r in self.runs] + [(r.ended_at, -1) for r in self.runs])
        level = peak = 0
        for _, step in events:
            level += step
            peak = max(peak, level)
        return max(1, peak)

    def resample(self, run_ids: list[str]) -> TraceData:
        """The same trace with these runs (repeats allowed: a bootstrap sample), each with its attempts."""
        by_id = {r.run_id: r for r in self.runs}
        runs, attempts = [], []
        for i, run_id in enumerate(run_ids):
            run = by_id[run_id]
            new_id = f"{run_id}#{i}"
            runs.append(run.model_copy(update={"run_id": new_id}))  # keeps its segment
            attempts.extend(a.model_copy(update={"run_id": new_id}) for a in self.attempts_of(run_id))
        return TraceData(self.path, self.workflow, self.settings, runs, attempts, self.batches, list(self.notes))


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _known(model: type[BaseModel], value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        spec = model.model_fields.get(key)
        if spec is None:
            continue
        out[key] = _known(spec.annotation, item) if _is_model(spec.annotation) else item
    return out


def trace_path_for(path: str | Path) -> Path:
    """A trace path from a trace or a results file (`results.jsonl` -> `results.trace.jsonl`)."""
    p = Path(path)
    if p.name.endswith(TRACE_SUFFIX) or (p.exists() and _looks_like_trace(p)):
        return p
    if p.suffix == ".jsonl":
        return p.with_name(p.name.removesuffix(".jsonl") + TRACE_SUFFIX)
    return p


def _looks_like_trace(p: Path) -> bool:
    try:
        with p.open(encoding="utf-8") as f:
            first = f.readline()
        return json.loads(first).get("kind") == "batch"
    except (OSError, ValueError, AttributeError):
        return False


def read_trace(path: str | Path) -> TraceData:
    """Read a trace (or the trace next to a results file)."""
    p = trace_path_for(path)
    if not p.is_file():
        raise InputError(f"trace {str(p)!r} does not exist (written by `tailrace run` next to its results file)")
    workflow: WorkflowSpec | None = None
    settings: TraceSettings | None = None
    batches = cut = 0
    runs: list[TraceRun] = []
    attempts: list[TraceAttempt] = []
    with p.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            try:
                line = json.loads(text)
            except ValueError:
                cut += 1  # a line cut by a crash mid-write
                continue
            kind = line.get("kind") if isinstance(line, dict) else None
            try:
                if kind == "batch":
                    batches += 1
                    if workflow is None:
                        workflow = workflow_from_dict(line.get("workflow"), source=f"{p}:{number} (batch line)")
                    if "settings" in line:
                        settings = TraceSettings.model_validate(line["settings"])
                elif kind == "run":
                    runs.append(TraceRun.model_validate({**line, "segment": max(0, batches - 1)}))
                elif kind == "attempt":
                    attempts.append(TraceAttempt.model_validate(line))
            except pydantic.ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(x) for x in first["loc"]) or "line"
                raise InputError(f"{p}:{number}: {kind} line, field {where}: {first['msg']}") from None
            except SpecErrors as exc:
                raise InputError(f"{p}:{number}: the workflow in the batch line is invalid: {exc}") from None
    if workflow is None:
        raise InputError(f"{p}: not a tailrace trace (no batch line with the workflow)")
    if not runs:
        raise InputError(f"{p}: the trace has no finished runs")
    notes = []
    if settings is None:
        notes.append("the trace does not record the settings its batch ran with: assuming the defaults")
        settings = TraceSettings()
    if batches > 1:
        notes.append(f"the trace holds {batches} batches (resumed, or run in parts): read as one, back to back")
    if cut:
        notes.append(f"{cut} line(s) cut by a crash were skipped")
    data = TraceData(p, workflow, settings, runs, attempts, batches, notes)
    _check_attempts(data)
    return data


def _check_attempts(data: TraceData) -> None:
    known = {(s.id, m.provider, m.model) for s in data.workflow.steps for m in s.models}
    for a in data.attempts:
        if (a.step_id, a.provider, a.model) not in known:
            raise InputError(
                f"{data.path}: attempt {a.run_id}/{a.step_id}#{a.attempt} used {a.provider}/{a.model}, "
                f"which is not on step {a.step_id!r}'s ladder in the trace's workflow"
            )
    answered = sum(1 for a in data.attempts if a.outcome in (AttemptOutcome.VALID, AttemptOutcome.INVALID))
    if answered == 0:
        raise InputError(f"{data.path}: no attempt in the trace was answered: nothing to learn latencies from")


__all__ = ["TraceAttempt", "TraceData", "TraceRun", "TraceSettings", "read_trace", "trace_path_for"]
