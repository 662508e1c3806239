"""What every fault test of the reliability suite asserts about a finished batch."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tailrace.engine.outcomes import FailureReason, RunOutcome

TYPED = {r.value for r in FailureReason}


def assert_each_run_typed_and_on_time(outcomes: list[RunOutcome], grace_s: float, slack_s: float = 0.5) -> None:
    """Each run ended delivered or failed with one known reason, by its deadline + grace (+ scheduling slack)."""
    for o in outcomes:
        assert o.delivered or (o.failure is not None and o.failure.value in TYPED), o
        assert o.ended_at <= o.deadline_at + grace_s + slack_s, f"{o.run_id} outlived its deadline + grace"


def results_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a results file, each parsed (a line that does not parse fails the test)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_each_run_once(path: Path, expected_runs: int) -> list[dict[str, Any]]:
    lines = results_lines(path)
    counts = Counter(line["run_id"] for line in lines)
    repeated = {k: v for k, v in counts.items() if v > 1}
    assert not repeated, f"runs written more than once: {repeated}"
    assert len(lines) == expected_runs, f"{len(lines)} runs written, {expected_runs} expected"
    return lines
