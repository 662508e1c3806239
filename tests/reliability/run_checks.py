"""What every fault test of the reliability suite asserts about a finished batch."""

from __future__ import annotations

import json
import time
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


def wait_until_the_journal_knows(steps: int, within_s: float = 30.0) -> bool:
    """Wait until the running batch's attempt journal holds `steps` steps in flight (executors report
    every 0.1 s, later under load): a fault injected before that would test the load, not the journal."""
    import ray

    from tailrace.actors.attempt_journal import NAMESPACE

    end = time.monotonic() + within_s
    while time.monotonic() < end:
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == NAMESPACE and a["name"].startswith("tailrace-attempt-journal-")
        ]
        for name in names:
            try:
                if ray.get(ray.get_actor(name, namespace=NAMESPACE).stats.remote(), timeout=5)["steps"] >= steps:
                    return True
            except Exception:  # a journal of a batch that just ended
                continue
        time.sleep(0.05)
    return False


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
