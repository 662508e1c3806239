"""The what-if from Python: `what_if` predicts a policy from a trace, `tune` searches for the cheapest one
that meets a target. Both replay on fake time in this process (`tailrace.whatif`); no cluster is
started. What lives here rather than there: the driver's run admission under a budget
(`tailrace.cluster.budget.BudgetAdmission`), plugged into the replay, so a predicted quota refuses
runs the way a real batch would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tailrace.engine.clock import Clock
from tailrace.engine.specs import WorkflowSpec
from tailrace.policies.budget_config import BudgetConfig
from tailrace.whatif.change import WhatIf
from tailrace.whatif.prediction import Prediction, predict
from tailrace.whatif.search import TuneResult
from tailrace.whatif.search import tune as _tune
from tailrace.whatif.trace_data import TraceData


def budget_admission(config: BudgetConfig, workflow: WorkflowSpec, clock: Clock) -> Any:
    """The admission a budgeted batch runs with, on the replay's clock (no budget actor behind it)."""
    from tailrace.cluster.budget import BudgetAdmission

    return BudgetAdmission(config, workflow, actor=None, clock=clock)


def what_if(
    trace: str | Path | TraceData,
    change: WhatIf | None = None,
    *,
    runs: int | None = None,
    replays: int = 5,
    seed: int = 0,
    jobs: int = 1,
    **changes: Any,
) -> Prediction:
    """Predict hit rate, latency quantiles, extra tokens, cost per delivered run and 429s of a policy,
    from a trace written by `tailrace run` (`results.trace.jsonl`, or the results file next to it).

    The policy is the trace's own with `change` (a `WhatIf`) or the same fields as keywords:
    `what_if("results.jsonl", hedge={"ttft_quantile": 0.8}, deadline_s=12, tpm=200_000)`.
    Each metric comes with a 95% interval over `replays` replays of `runs` runs (default: as many
    as the trace has), `jobs` of them at once in processes of their own (0: one per CPU).
    """
    if changes:
        change = WhatIf.model_validate({**(change.model_dump() if change else {}), **changes})
    return predict(trace, change, runs=runs, replays=replays, seed=seed, admission=budget_admission, jobs=jobs)


def tune(
    trace: str | Path | TraceData,
    *,
    target_hit: float,
    max_extra_tokens: float,
    base: WhatIf | None = None,
    runs: int | None = None,
    screen_runs: int | None = None,
    replays: int = 3,
    seed: int = 0,
    jobs: int = 1,
) -> TuneResult:
    """The cheapest tail control (hedge trigger and duplicates, ladder order, deadline share) that meets
    `target_hit` with at most `max_extra_tokens` extra tokens on the trace's workload, by replaying it.
    `result.config_yaml()` is the config to paste into the workflow. `base`: other changes to hold
    (a deadline, a budget). `jobs` replays at once, in processes of their own (0: one per CPU)."""
    return _tune(
        trace,
        target_hit=target_hit,
        max_extra_tokens=max_extra_tokens,
        base=base,
        runs=runs,
        screen_runs=screen_runs,
        replays=replays,
        seed=seed,
        admission=budget_admission,
        jobs=jobs,
    )


__all__ = ["TuneResult", "WhatIf", "budget_admission", "tune", "what_if"]
