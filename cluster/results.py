"""Results stream to JSONL as runs finish (an interrupted batch loses nothing already done), and a
running summary is kept in constant memory per run (one float each).

Writing one run can never cost another: an outcome whose text cannot be encoded as UTF-8 (a lone
surrogate from a provider's answer) is written with that text escaped and says so in its detail, and
a write the file system refuses is logged and counted while the batch goes on, the next line starting
on a line of its own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from tailrace.engine.outcomes import RunOutcome
from tailrace.runtime import run_metrics

log = logging.getLogger("tailrace")
_NO_REQUESTS: dict[str, Any] = {"attempts": {"__all__": {"request"}}}


class ResultWriter:
    """Appends one JSON line per finished run and flushes it at once."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._file: IO[str] | None = None
        self._torn = False  # a write failed part-way: the next line must start on a fresh line
        self.failed_writes = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def write(self, outcome: RunOutcome) -> None:
        if self._file is None:
            return
        line = outcome_line(outcome)
        try:
            self._file.write(("\n" if self._torn else "") + line + "\n")
            self._file.flush()
            self._torn = False
        except OSError as exc:  # disk full, file gone: this run's line is lost, the batch is not
            self._torn = True
            self.failed_writes += 1
            run_metrics.internal_error("results_write", exc)
            log.error("could not write the outcome of run %r to %s: %s", outcome.run_id, self.path, exc)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def outcome_line(outcome: RunOutcome) -> str:
    """The outcome as one JSON line (without the attempts' requests: those belong in the trace, which
    can redact them). Text that cannot be encoded is escaped (`\\ud800`) and an answer nested too deep
    to write is left out, each said in the detail: never a reason to lose the run."""
    try:
        return outcome.model_dump_json(exclude=_NO_REQUESTS)
    except (ValueError, RecursionError):  # PydanticSerializationError: a lone surrogate, or nested too deep
        pass
    fallbacks = (
        (_NO_REQUESTS, "text that cannot be encoded as UTF-8 (a lone surrogate) was escaped in this record"),
        ({**_NO_REQUESTS, "outputs": True}, "the outputs are nested too deeply to write and were left out"),
    )
    for exclude, note in fallbacks:
        try:
            data = _escaped(outcome.model_dump(mode="python", exclude=exclude))
            data.setdefault("outputs", {})
            data["detail"] = f"{data['detail']}; {note}" if data.get("detail") else note
            return json.dumps(data, ensure_ascii=False, default=str, separators=(",", ":"))
        except RecursionError:
            continue
    raise AssertionError("unreachable: an outcome without outputs is shallow")


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


def finished_run_ids(path: str | Path) -> set[str]:
    """Run ids already written to a results file (used to resume a batch)."""
    done: set[str] = set()
    p = Path(path)
    if not p.exists():
        return done
    with p.open(encoding="utf-8") as f:
        for line in f:
            try:
                done.add(json.loads(line)["run_id"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash mid-write: that run is simply run again
    return done


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


class BatchSummary(BaseModel):
    runs: int = 0
    delivered: int = 0
    on_time: int = 0
    failures: dict[str, int] = {}
    degraded_runs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 0
    latencies_s: list[float] = []

    def add(self, outcome: RunOutcome) -> None:
        self.runs += 1
        self.delivered += outcome.delivered
        self.on_time += outcome.on_time
        if outcome.failure is not None:
            self.failures[outcome.failure.value] = self.failures.get(outcome.failure.value, 0) + 1
        self.degraded_runs += bool(outcome.degraded_steps)
        self.input_tokens += outcome.input_tokens
        self.output_tokens += outcome.output_tokens
        self.cost_usd += outcome.cost_usd
        self.attempts += len(outcome.attempts)
        self.latencies_s.append(outcome.latency_s)

    @property
    def hit_rate(self) -> float:
        return self.on_time / self.runs if self.runs else 0.0

    def percentiles(self) -> dict[str, float]:
        values = sorted(self.latencies_s)
        return {name: quantile(values, q) for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}
