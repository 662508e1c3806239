"""What to change before replaying a trace: `WhatIf`, and the replay plan it makes of a trace's settings.

Every field is optional: what is not set stays as the trace's batch ran it. Bad input names its
field (`hedge.ttft_quantil: unknown setting; known: ...`, `ladder[reply]: gpt-5 is not on this
step's ladder`).
"""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tailrace.engine.errors import SpecError
from tailrace.engine.specs import HedgeConfig, ModelChoice, StepSpec, WorkflowSpec
from tailrace.policies.budget_config import BudgetConfig, LimitSpec
from tailrace.whatif.replay import ReplayPlan
from tailrace.whatif.trace_data import TraceData

ALL_STEPS = "*"


class WhatIf(BaseModel):
    """A policy to predict from a trace: the trace's own, with these changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deadline_s: float | None = Field(default=None, gt=0)
    # HedgeConfig fields to set, e.g. {"ttft_quantile": 0.9} or {"enabled": False}.
    hedge: dict[str, Any] = Field(default_factory=dict)
    # Step id (or "*" for every step) -> its ladder as model names, strongest first: a reordering
    # or a subset of the models the step has.
    ladder: dict[str, list[str]] = Field(default_factory=dict)
    # Tokens per minute the cluster budget allows each provider account the workflow uses.
    tpm: int | None = Field(default=None, gt=0)
    budget: BudgetConfig | None = None  # the whole budget instead (`tpm` adds to it)
    max_cost_usd: float | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, ge=1)  # runs in flight at once
    executors: int | None = Field(default=None, ge=1)

    @field_validator("hedge")
    @classmethod
    def _hedge_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        known = HedgeConfig.model_fields
        for name in value:
            if name not in known:
                raise ValueError(f"{name}: unknown setting; known: {', '.join(sorted(known))}")
        try:
            HedgeConfig.model_validate(value)
        except pydantic.ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            raise ValueError(f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
        return value

    @property
    def is_empty(self) -> bool:
        return self == WhatIf()

    def describe(self) -> str:
        """One line: what this changes."""
        parts = []
        if self.deadline_s is not None:
            parts.append(f"deadline {self.deadline_s:g} s")
        if self.hedge:
            parts.append("hedge " + ", ".join(f"{k}={v}" for k, v in self.hedge.items()))
        for step, models in self.ladder.items():
            parts.append(f"ladder[{step}] {' > '.join(models)}")
        if self.tpm is not None:
            parts.append(f"tpm {self.tpm:,}")
        if self.budget is not None:
            parts.append("budget " + ", ".join(f"{lim.account} {lim.quotas()}" for lim in self.budget.limits))
        if self.max_cost_usd is not None:
            parts.append(f"max cost ${self.max_cost_usd:g}")
        if self.concurrency is not None:
            parts.append(f"{self.concurrency} runs in flight")
        if self.executors is not None:
            parts.append(f"{self.executors} executors")
        return "; ".join(parts) or "as recorded"


def plan_for(data: TraceData, change: WhatIf) -> ReplayPlan:
    """The trace's settings with the change applied."""
    s = data.settings
    options = data.options()
    update: dict[str, Any] = {}
    if change.deadline_s is not None:
        update["deadline_s"] = change.deadline_s
    if change.max_cost_usd is not None:
        update["max_cost_usd"] = change.max_cost_usd
    options = options.model_copy(update=update) if update else options
    hedge = HedgeConfig.model_validate({**s.hedge.model_dump(), **change.hedge}) if change.hedge else s.hedge
    return ReplayPlan(
        workflow=_with_ladders(data.workflow, change.ladder),
        options=options,
        hedge=hedge,
        tuning=s.tuning,
        budget=_budget(data, change),
        executors=change.executors or s.executors,
        concurrency=change.concurrency or data.concurrency(),
        grace_s=s.grace_s,
    )


def _budget(data: TraceData, change: WhatIf) -> BudgetConfig | None:
    budget = change.budget or data.settings.budget
    if change.tpm is None:
        return budget
    budget = budget or BudgetConfig()
    accounts = sorted({budget.account_of(m.provider) for s in data.workflow.steps for m in s.models})
    kept = [lim for lim in budget.limits if lim.account not in accounts or lim.model is not None]
    limits = kept + [LimitSpec(account=a, tpm=change.tpm) for a in accounts]
    return budget.model_copy(update={"limits": limits})


def _with_ladders(workflow: WorkflowSpec, ladders: dict[str, list[str]]) -> WorkflowSpec:
    if not ladders:
        return workflow
    ids = {s.id for s in workflow.steps}
    for step_id in ladders:
        if step_id != ALL_STEPS and step_id not in ids:
            raise SpecError(f"ladder[{step_id}]", f"no such step; steps: {', '.join(sorted(ids))}")
    steps = []
    for step in workflow.steps:
        order = ladders.get(step.id, ladders.get(ALL_STEPS))
        steps.append(step if order is None else _reordered(step, order, explicit=step.id in ladders))
    return workflow.model_copy(update={"steps": steps})


def _reordered(step: StepSpec, order: list[str], explicit: bool) -> StepSpec:
    by_name: dict[str, ModelChoice] = {}
    for m in step.models:
        by_name.setdefault(m.model, m)
        by_name.setdefault(f"{m.provider}/{m.model}", m)
    models = []
    for name in order:
        choice = by_name.get(name)
        if choice is None:
            if not explicit:
                continue  # "*": a step without this model keeps the rest of the order
            have = ", ".join(m.model for m in step.models)
            raise SpecError(f"ladder[{step.id}]", f"{name} is not on this step's ladder (it has {have})")
        if choice not in models:
            models.append(choice)
    if not models:
        raise SpecError(f"ladder[{step.id}]", "no model of the step is left on its ladder")
    return step.model_copy(update={"models": models})


__all__ = ["ALL_STEPS", "WhatIf", "plan_for"]
