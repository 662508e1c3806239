"""What runs of one workflow use and how long they take, learned from runs that finished: admission's evidence.

Per step it learns the tokens its attempts were counted for against each bucket (retries and
duplicates included, as the provider's window counts them) and how long the step took from its first
attempt to its answer. Before any run has delivered, a step's need is its prompt estimate alone (what
the run will surely use) and its time is unknown, so admission plans with those and refuses nothing
on a guess; the first delivered runs replace both with what was measured (a running mean for the
first `WARM_RUNS`, then an exponential average). A step's *tail* is the time from its start to the
run's end: its own time plus the longest tail after it, with a margin, stretched while admitted runs
come in late.

Pure: feed it `RunOutcome`s; no clock, no Ray.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping

from tailrace.engine.dag import Dag
from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, FailureReason, RunOutcome
from tailrace.engine.specs import StepSpec, WorkflowSpec
from tailrace.engine.tokens import estimate_prompt_tokens
from tailrace.policies.budget_config import BucketSpec, Charges, reserve_amount, settled_amount
from tailrace.policies.spend import SpendAsk, Usage

WARM_RUNS = 10  # delivered runs averaged equally before the exponential average takes over
LEARNING_RATE = 0.1
LATENCY_SAMPLES = 200  # per step
TAIL_QUANTILE = 0.95  # of a step's time, once there are enough samples (before: the longest seen)
QUANTILE_AFTER = 20
TAIL_MARGIN = 1.2
LATE_STRETCH = 1.25  # per admitted run that ended late
MAX_LATE_SCALE = 4.0
TOKENS_PER_REFERENCE = 16  # a `{{...}}` the cold prompt estimate cannot see: count a little for it
_REFERENCE = re.compile(r"\{\{[^}]*\}\}")

Buckets = Callable[[str, str], list[tuple[BucketSpec, Charges]]]


def prompt_floor(step: StepSpec) -> int:
    """The fewest prompt tokens the step's first rung can send: its templates with references nearly empty."""
    choice = step.models[0]
    prompt = choice.prompt or step.prompt
    system = choice.system or step.system or ""
    references = len(_REFERENCE.findall(prompt + system))
    return (
        estimate_prompt_tokens(_REFERENCE.sub("", system) or None, _REFERENCE.sub("", prompt))
        + TOKENS_PER_REFERENCE * references
    )


def attempt_charge(spec: BucketSpec, charges: Charges, record: AttemptRecord, max_tokens: int) -> float:
    """What one finished attempt counted against a bucket (as `settled_amount` settled it)."""
    prompt = record.input_tokens
    if not record.usage_reported and record.request is not None:
        prompt = max(prompt, estimate_prompt_tokens(record.request.system, record.request.prompt))
    ask = SpendAsk(input_tokens=prompt, max_output_tokens=max_tokens, cost_usd=record.cost_usd)
    used = Usage(
        record.input_tokens,
        record.output_tokens,
        record.cost_usd,
        reported=record.usage_reported,
        cancelled=record.outcome == AttemptOutcome.CANCELLED,
        valid=record.outcome == AttemptOutcome.VALID,
    )
    return settled_amount(spec, charges, ask, used)


class RunProfile:
    def __init__(self, workflow: WorkflowSpec, buckets: Buckets) -> None:
        self._workflow = workflow
        self._buckets = buckets
        self._dag = Dag.from_spec(workflow)
        self._need: dict[str, dict[str, float]] = {s.id: self._floor(s) for s in workflow.steps}
        self._times: dict[str, deque[float]] = {s.id: deque(maxlen=LATENCY_SAMPLES) for s in workflow.steps}
        self.delivered = 0  # runs learned from
        self.late_scale = 1.0

    def _floor(self, step: StepSpec) -> dict[str, float]:
        choice = step.models[0]
        ask = SpendAsk(input_tokens=prompt_floor(step), max_output_tokens=0)
        return {spec.key: reserve_amount(spec, ask) for spec, _ in self._buckets(choice.provider, choice.model)}

    @property
    def cold(self) -> bool:
        return self.delivered == 0

    # ---- what a new run needs -------------------------------------------------------------------

    def step_need(self, step_id: str) -> dict[str, float]:
        return dict(self._need[step_id])

    def run_need(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for need in self._need.values():
            for key, amount in need.items():
                total[key] = total.get(key, 0.0) + amount
        return total

    def step_time(self, step_id: str) -> float:
        samples = self._times[step_id]
        if not samples:
            return 0.0
        ordered = sorted(samples)
        if len(ordered) < QUANTILE_AFTER:
            return ordered[-1]
        return ordered[int(TAIL_QUANTILE * (len(ordered) - 1))]

    def tails(self) -> dict[str, float]:
        """Per step, the time from its start to the run's end (0 while nothing is learned)."""
        times = {s.id: self.step_time(s.id) * TAIL_MARGIN * self.late_scale for s in self._workflow.steps}
        return self._dag.remaining_critical_paths(times)

    def critical_path_s(self) -> float:
        return max(self.tails().values(), default=0.0)

    def roots(self) -> list[str]:
        return self._dag.roots()

    # ---- learning from finished runs --------------------------------------------------------------

    def charged(self, outcome: RunOutcome) -> dict[str, dict[str, float]]:
        """Per step, what its attempts counted against each bucket."""
        per_step: dict[str, dict[str, float]] = {}
        for a in outcome.attempts:
            step = self._workflow.step(a.step_id)
            choice = step.models[a.tier] if a.tier < len(step.models) else step.models[0]
            charged = per_step.setdefault(a.step_id, {})
            for spec, charges in self._buckets(a.provider, a.model):
                charged[spec.key] = charged.get(spec.key, 0.0) + attempt_charge(spec, charges, a, choice.max_tokens)
        return per_step

    def learn(self, outcome: RunOutcome, admitted: bool = True) -> None:
        if outcome.delivered:
            self.delivered += 1
            rate = max(LEARNING_RATE, 1.0 / min(self.delivered, WARM_RUNS))
            for step_id, charged in self.charged(outcome).items():
                learned = self._need[step_id]
                for key in set(learned) | set(charged):
                    learned[key] = (1 - rate) * learned.get(key, 0.0) + rate * charged.get(key, 0.0)
            for step_id, seconds in self._step_times(outcome).items():
                self._times[step_id].append(seconds)
        if not admitted:
            return
        if outcome.failure == FailureReason.DEADLINE_EXCEEDED:
            self.late_scale = min(MAX_LATE_SCALE, self.late_scale * LATE_STRETCH)
        elif outcome.on_time:
            self.late_scale = max(1.0, self.late_scale * 0.99)

    @staticmethod
    def _step_times(outcome: RunOutcome) -> dict[str, float]:
        """From each step's first attempt to its answer (retries and failovers inside it count)."""
        first: dict[str, float] = {}
        answered: dict[str, float] = {}
        for a in outcome.attempts:
            first[a.step_id] = min(first.get(a.step_id, a.started_at), a.started_at)
            if a.outcome == AttemptOutcome.VALID:
                answered[a.step_id] = min(answered.get(a.step_id, a.ended_at), a.ended_at)
        return {s: max(0.0, answered[s] - first[s]) for s in answered}

    def describe(self) -> str:
        if self.cold:
            return "prompt estimates only: no run of this workflow has delivered yet"
        return f"learned from {self.delivered} delivered runs"


def per_bucket_total(per_step: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for charged in per_step.values():
        for key, amount in charged.items():
            total[key] = total.get(key, 0.0) + amount
    return total


__all__ = ["RunProfile", "attempt_charge", "per_bucket_total", "prompt_floor"]
