"""Search the tail-control settings for the cheapest policy that meets a hit-rate target within an
extra-token allowance, by replaying a trace (`tailrace tune TRACE --target-hit 0.999 --max-extra-tokens 0.08`).

The search is a short coordinate descent, every candidate a replay of the same trace on fake time:

1. the hedge trigger and how many duplicates a step may send (a grid over the `HedgeConfig` fields
   this version has: `max_extra_load` where it exists, else the TTFT trigger quantile; plus hedging
   off), each screened with one replay of `screen_runs` runs;
2. the ladder's order (each model of the ladder first, the others after it in their order; never a
   model the trace did not see answer), from the best policy of step 1;
3. the deadline share a rung must fit in (`fit_quantile`: the quantile of a rung's latency that must
   fit in its step's share of the time left, the deadline-aware ladder's knob);
4. the best few confirmed with full replays (intervals included). Cheapest = lowest cost per
   delivered run among those whose predicted hit rate and extra tokens meet the targets; when none
   does, the one nearest to them, and the result says so.

The answer is a config to paste: per-step `hedge:` fields (only those that change), the ladder
order, and the same as Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tailrace.engine.specs import HedgeConfig
from tailrace.policies.latency import model_key
from tailrace.whatif.change import ALL_STEPS, WhatIf, plan_for
from tailrace.whatif.fit import TraceFit, fit_trace
from tailrace.whatif.prediction import (
    Estimate,
    Metrics,
    Prediction,
    in_processes,
    predict,
    records_for,
    replay_metrics,
    warnings_for,
)
from tailrace.whatif.replay import AdmissionFactory, ReplayPlan
from tailrace.whatif.trace_data import TraceData, read_trace

CONFIRM = 3  # candidates confirmed with full replays


class Candidate(BaseModel):
    model_config = ConfigDict(frozen=True)

    change: WhatIf
    screened: Metrics
    prediction: Prediction | None = None  # once confirmed

    @property
    def hit_rate(self) -> float:
        return self.prediction["hit_rate"].mean if self.prediction else self.screened.hit_rate

    @property
    def extra_tokens(self) -> float:
        return self.prediction["extra_tokens"].mean if self.prediction else self.screened.extra_tokens

    @property
    def cost(self) -> float:
        return (
            self.prediction["cost_per_delivered_usd"].mean if self.prediction else self.screened.cost_per_delivered_usd
        )


class TuneResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    trace: str
    target_hit: float
    max_extra_tokens: float
    best: Candidate | None  # the cheapest that meets the targets
    nearest: Candidate  # the best found (= best when it meets them)
    tried: list[Candidate]
    recorded: Metrics
    warnings: list[str] = Field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.best is not None

    def estimates(self) -> dict[str, Estimate]:
        chosen = self.best or self.nearest
        assert chosen.prediction is not None
        return chosen.prediction.predicted

    def config_yaml(self) -> str:
        return config_snippets(self.best or self.nearest)[0]

    def config_python(self) -> str:
        return config_snippets(self.best or self.nearest)[1]


def _meets(c: Candidate, target_hit: float, max_extra: float) -> bool:
    return c.hit_rate >= target_hit and c.extra_tokens <= max_extra


def _shortfall(c: Candidate, target_hit: float, max_extra: float) -> tuple[float, float]:
    """How far from the targets (0 when met), then cost: the order candidates are ranked in."""
    miss = max(0.0, target_hit - c.hit_rate) + max(0.0, c.extra_tokens - max_extra)
    return miss, c.cost if math.isfinite(c.cost) else math.inf


def hedge_grid(base: HedgeConfig) -> list[dict[str, Any]]:
    """Step 1's candidates: the trigger knob this version has, times one or two duplicates; and off."""
    fields = HedgeConfig.model_fields
    if "max_extra_load" in fields:
        trigger = [{"max_extra_load": v} for v in (0.01, 0.02, 0.05, 0.1, 0.2)]
    else:
        trigger = [{"ttft_quantile": v} for v in (0.7, 0.8, 0.9, 0.95, 0.99)]
    grid = [{**t, "max_duplicates": d, "enabled": True} for t in trigger for d in (1, 2)]
    return [*grid, {"enabled": False}]


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
    admission: AdmissionFactory | None = None,
    jobs: int = 1,
) -> TuneResult:
    """The cheapest tail control for the trace's workload that meets `target_hit` (a fraction, e.g.
    0.999) with at most `max_extra_tokens` (a fraction, e.g. 0.08) of tokens beyond the answers used.
    `base` fixes other changes (a deadline, a budget) the search runs under."""
    if not 0 < target_hit <= 1:
        raise ValueError(f"target_hit must be a fraction in (0, 1], got {target_hit}")
    if max_extra_tokens < 0:
        raise ValueError(f"max_extra_tokens must be >= 0, got {max_extra_tokens}")
    data = trace if isinstance(trace, TraceData) else read_trace(trace)
    base = base or WhatIf()
    fit = fit_trace(data)
    n = runs or len(data.runs)
    screen = min(n, screen_runs or min(n, 500))
    records = records_for(data, screen)
    tried: dict[str, Candidate] = {}

    def screen(changes: list[WhatIf]) -> list[Candidate]:
        todo = [c for c in changes if c.model_dump_json() not in tried]
        tasks = [_Screen(data, fit, plan_for(data, c), records, seed, admission) for c in todo]
        for change, metrics in zip(todo, in_processes(_screened, tasks, jobs), strict=True):
            tried[change.model_dump_json()] = Candidate(change=change, screened=metrics)
        return [tried[c.model_dump_json()] for c in changes]

    def rank(cands: Sequence[Candidate]) -> list[Candidate]:
        return sorted(cands, key=lambda c: _shortfall(c, target_hit, max_extra_tokens))

    best = rank(screen([_with(base, hedge=h) for h in hedge_grid(data.settings.hedge)]))[0]
    best = rank([best, *screen([_with(best.change, ladder={ALL_STEPS: o}) for o in _ladder_orders(data, fit)])])[0]
    screen([_with(best.change, hedge={**best.change.hedge, "fit_quantile": q}) for q in (0.8, 0.9, 0.95)])
    finalists = rank(list(tried.values()))[:CONFIRM]
    confirmed = [
        c.model_copy(
            update={
                "prediction": predict(
                    data, c.change, runs=n, replays=replays, seed=seed, admission=admission, fit=fit, jobs=jobs
                )
            }
        )
        for c in finalists
    ]
    ranked = rank(confirmed)
    met = [c for c in ranked if _meets(c, target_hit, max_extra_tokens)]
    return TuneResult(
        trace=str(data.path),
        target_hit=target_hit,
        max_extra_tokens=max_extra_tokens,
        best=min(met, key=lambda c: c.cost) if met else None,
        nearest=ranked[0],
        tried=list(tried.values()),
        recorded=confirmed[0].prediction.recorded if confirmed[0].prediction else finalists[0].screened,
        warnings=warnings_for(data, fit, n),
    )


@dataclass(frozen=True)
class _Screen:
    data: TraceData
    fit: TraceFit
    plan: ReplayPlan
    records: list[tuple[str, dict[str, Any]]]
    seed: int
    admission: AdmissionFactory | None


def _screened(task: _Screen) -> Metrics:
    """One candidate, one replay (the same seed for every candidate: their differences are the policy's)."""
    return replay_metrics(task.fit, task.plan, task.records, task.seed, task.admission)[0]


def _with(change: WhatIf, **update: Any) -> WhatIf:
    return WhatIf.model_validate({**change.model_dump(), **update})


def _ladder_orders(data: TraceData, fit: TraceFit) -> list[list[str]]:
    """Each model of the workflow's ladders first, the rest after it in their order; not a model the
    trace never saw answer (its latency would be the workflow's prior, not evidence)."""
    first = data.workflow.steps[0].models
    names = [m.model for m in first]
    seen = {m.model for m in first if not fit.models[model_key(m.provider, m.model)].from_prior}
    return [[name, *(n for n in names if n != name)] for name in names[1:] if name in seen]


def config_snippets(c: Candidate) -> tuple[str, str]:
    """(YAML for the workflow's steps, Python for run_batch) of a candidate's changes."""
    hedge = {k: v for k, v in c.change.hedge.items() if not (k == "enabled" and v is True)}
    lines = []
    if hedge:
        inner = ", ".join(f"{k}: {_yaml(v)}" for k, v in hedge.items())
        lines.append(f"hedge: {{{inner}}}   # under every step (a step's hedge sets only these fields)")
    for step, order in c.change.ladder.items():
        where = "every step" if step == ALL_STEPS else f"step {step}"
        lines.append(f"# models of {where}, in this order: {', '.join(order)}")
    if not lines:
        lines.append("# no change: the trace's policy is already the cheapest that meets the targets")
    fields = ", ".join(f"{k}={v!r}" for k, v in hedge.items())
    python = (
        f"run_batch(..., config=BatchConfig(hedge=HedgeConfig({fields})))"
        if fields
        else "run_batch(...)  # hedging as it was"
    )
    return "\n".join(lines), python


def _yaml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


__all__ = ["Candidate", "TuneResult", "config_snippets", "hedge_grid", "tune"]
