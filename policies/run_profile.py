"""What runs of one workflow use and how long they take, learned from runs that finished: admission's evidence.

Per step it learns the tokens its attempts were counted for against each bucket (retries and
duplicates included, as the provider's window counts them), from delivered runs (a running mean for
the first `WARM_RUNS`, then an exponential average), and the step's *tail*: the time from its first
attempt to the run's end (hops between steps and waits for budget included), measured in each run
that answered every step, then its 95th percentile over runs.

Before any run has delivered (a *cold* workflow) nothing is measured. A step is then planned at what
the provider takes when the request is admitted (prompt estimate + max_tokens: an upper bound, never
exceeded), and its time from the spec's latency priors, but scaled so the whole run's path takes at
most `COLD_PATH_SHARE` of the time the run has: the priors are guesses, and a guess must never be the
reason to refuse a run. Tails carry a margin and are stretched while admitted runs come in late
(relaxing with time, so a bad spell never refuses everything for good).

Pure: feed it `RunOutcome`s with the time; no clock, no Ray.
"""

from __future__ import annotations

import math
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
TAIL_SAMPLES = 200  # runs whose tails are remembered
TAIL_QUANTILE = 0.95  # of a step's tail over runs, once there are enough samples (before: the longest seen)
QUANTILE_AFTER = 20
TAIL_MARGIN = 1.1
LATE_STRETCH = 1.25  # when admitted runs end late (at most once per LATE_STRETCH_EVERY_S: late runs come in clumps)
LATE_STRETCH_EVERY_S = 1.0
MAX_LATE_SCALE = 4.0
LATE_HALF_LIFE_S = 10.0  # the stretch relaxes toward 1 with time, so refusing everything never lasts
COLD_PATH_SHARE = 0.5  # a cold run's planned path takes at most this share of its time, whatever the priors
PRIOR_FACTOR = 1.5  # the priors are medians: a cold step is planned at this multiple (admission_latency_factor)
TOKENS_PER_REFERENCE = 64  # a `{{...}}` the cold prompt estimate cannot see: what it may expand to
_REFERENCE = re.compile(r"\{\{[^}]*\}\}")

Buckets = Callable[[str, str], list[tuple[BucketSpec, Charges]]]


def prompt_guess(step: StepSpec) -> int:
    """The prompt tokens the step's first rung sends, from its templates: each reference counted as a
    short paragraph (the records and upstream answers are not known before the run)."""
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
    def __init__(self, workflow: WorkflowSpec, buckets: Buckets, prior_factor: float = PRIOR_FACTOR) -> None:
        self._workflow = workflow
        self._buckets = buckets
        self._dag = Dag.from_spec(workflow)
        self._worst = {s.id: self._admission_charge(s) for s in workflow.steps}  # what the provider takes
        self._need: dict[str, dict[str, float]] = {step: dict(charge) for step, charge in self._worst.items()}
        # Per step, its tail in each run that answered every step: the p95 of the path, not a sum of p95s.
        self._tails: dict[str, deque[float]] = {s.id: deque(maxlen=TAIL_SAMPLES) for s in workflow.steps}
        self._prior_times = {s.id: prior_factor * s.models[0].expected_latency_s for s in workflow.steps}
        self.delivered = 0  # runs learned from
        self._late = (1.0, 0.0)  # (stretch, when it was set)
        self._last_late = -math.inf

    def _admission_charge(self, step: StepSpec) -> dict[str, float]:
        choice = step.models[0]
        ask = SpendAsk(input_tokens=prompt_guess(step), max_output_tokens=choice.max_tokens)
        return {spec.key: reserve_amount(spec, ask) for spec, _ in self._buckets(choice.provider, choice.model)}

    @property
    def cold(self) -> bool:
        """Nothing measured yet: no run delivered (its need is unknown), or some step never answered."""
        return self.delivered == 0 or any(not samples for samples in self._tails.values())

    # ---- what a new run needs -------------------------------------------------------------------

    def worst_case_share(self, key: str) -> float:
        """Of what an attempt reserves against `key`, the share a run does not use on average (learned):
        what in-flight holds take beyond the plan. 0 while cold (the plan is the worst case then)."""
        worst = sum(charge.get(key, 0.0) for charge in self._worst.values())
        used = self.run_need().get(key, 0.0)
        return max(0.0, 1.0 - used / worst) if worst > 0 else 0.0

    def step_need(self, step_id: str) -> dict[str, float]:
        return dict(self._need[step_id])

    def run_need(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for need in self._need.values():
            for key, amount in need.items():
                total[key] = total.get(key, 0.0) + amount
        return total

    def _tail(self, step_id: str) -> float:
        ordered = sorted(self._tails[step_id])
        if not ordered:
            return 0.0
        if len(ordered) < QUANTILE_AFTER:
            return ordered[-1]
        return ordered[int(TAIL_QUANTILE * (len(ordered) - 1))]

    def late_scale(self, now: float) -> float:
        """How much admitted runs coming in late stretch the tails: relaxes toward 1 with time."""
        stretch, at = self._late
        return 1.0 + (stretch - 1.0) * 0.5 ** (max(0.0, now - at) / LATE_HALF_LIFE_S)

    def _stretch(self, factor: float, now: float) -> None:
        self._late = (min(MAX_LATE_SCALE, max(1.0, self.late_scale(now) * factor)), now)

    def tails(self, now: float, remaining_s: float = math.inf) -> dict[str, float]:
        """Per step, the time from its start to the run's end, for a run with `remaining_s` to go."""
        late = self.late_scale(now)
        if self.cold:
            tails = self._dag.remaining_critical_paths(self._prior_times)
            path = max(tails.values(), default=0.0)
            scale = min(1.0, COLD_PATH_SHARE * max(0.0, remaining_s) / path) if path > 0 else 1.0
            return {s: t * scale * late for s, t in tails.items()}
        return {s.id: self._tail(s.id) * TAIL_MARGIN * late for s in self._workflow.steps}

    def critical_path_s(self, now: float) -> float:
        """How long a run takes once it has its tokens: measured (0 while the workflow is cold)."""
        return 0.0 if self.cold else max(self.tails(now).values(), default=0.0)

    def finished_runs(self) -> int:
        """Runs whose path was measured (the critical path's evidence)."""
        return min((len(samples) for samples in self._tails.values()), default=0)

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

    def learn(self, outcome: RunOutcome, now: float, admitted: bool = True) -> None:
        # Tails are measured on every run that answered every step, late ones too (a slow spell shows there):
        # from the step's first attempt to the run's end, hops between steps and waits for budget included.
        starts = self._step_starts(outcome)
        if len(starts) == len(self._tails):
            for step_id, started in starts.items():
                self._tails[step_id].append(max(0.0, outcome.ended_at - started))
        if outcome.delivered:
            self.delivered += 1
            rate = max(LEARNING_RATE, 1.0 / min(self.delivered, WARM_RUNS))
            for step_id, charged in self.charged(outcome).items():
                learned = self._need[step_id]
                for key in set(learned) | set(charged):
                    learned[key] = (1 - rate) * learned.get(key, 0.0) + rate * charged.get(key, 0.0)
        if not admitted:
            return
        if outcome.failure == FailureReason.DEADLINE_EXCEEDED:
            if now - self._last_late >= LATE_STRETCH_EVERY_S:
                self._last_late = now
                self._stretch(LATE_STRETCH, now)
        elif outcome.on_time:
            self._stretch(0.99, now)

    @staticmethod
    def _step_starts(outcome: RunOutcome) -> dict[str, float]:
        """When each step that was answered started (its first attempt), wall clock."""
        first: dict[str, float] = {}
        answered: set[str] = set()
        for a in outcome.attempts:
            first[a.step_id] = min(first.get(a.step_id, a.started_at), a.started_at)
            if a.outcome == AttemptOutcome.VALID:
                answered.add(a.step_id)
        return {s: first[s] for s in answered}

    def describe(self) -> str:
        if self.cold:
            return "prompt + max_tokens of each step, what the provider takes at admission: no run has delivered yet"
        return f"what runs use, learned from {self.delivered} delivered runs"


def per_bucket_total(per_step: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for charged in per_step.values():
        for key, amount in charged.items():
            total[key] = total.get(key, 0.0) + amount
    return total


__all__ = ["RunProfile", "attempt_charge", "per_bucket_total", "prompt_guess"]
