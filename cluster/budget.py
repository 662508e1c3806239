"""The cluster budget from the driver's side: find or create the budget actor, refuse runs at
submission that cannot be served before their deadline, and report tenants' spend.

`BudgetAdmission` is the driver's `RunAdmission`. It decides from a local plan
(`tailrace.policies.admission.AdmissionPlanner`), so a refusal takes microseconds, not an actor round trip;
in the background it lowers the plan to what the budget actor says is really free (another
cluster on the same account, provider feedback). A run's need is learned per step from finished
runs (what their attempts were charged, retries included), starting from the templates' size, and
so is how long a run takes once it has its tokens (the critical path), starting from the models'
latency priors; admitted runs that come in late stretch that estimate until they stop coming late.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections import deque
from typing import Any

from tailrace.actors.budget_actor import BudgetHandle, budget_actor, find_budget_actor
from tailrace.engine.clock import SYSTEM_CLOCK, Clock, Deadline, RunDeadline, wait_for
from tailrace.engine.dag import Dag
from tailrace.engine.outcomes import AttemptOutcome, FailureReason, RunOutcome
from tailrace.engine.specs import RunOptions, StepSpec, WorkflowSpec
from tailrace.engine.tokens import estimate_tokens
from tailrace.policies.admission import AdmissionPlanner
from tailrace.policies.budget_config import BucketSpec, BudgetConfig, reserve_amount, settled_amount, utc_day
from tailrace.policies.spend import SpendAsk, Usage
from tailrace.runtime import metrics
from tailrace.runtime.budget_ledger import LedgerStatus, RedisLedger

LEARNING_RATE = 0.2  # weight of each finished run in a step's learned need
OBSERVED_RUNS = 200  # finished runs whose critical path latency is remembered
PATH_MARGIN = 1.2  # on top of the observed p95 critical path
MAX_LATE_SCALE = 4.0
TOKENS_PER_INPUT_GUESS = 64  # before any run finished: tokens a template reference expands to
_REFERENCE = re.compile(r"\{\{\s*(input|steps)\.([A-Za-z0-9_-]+)")


def ensure_budget(config: BudgetConfig, workflow: WorkflowSpec) -> BudgetHandle:
    """The cluster's budget actor, told about this workflow's limits; what executors need to use it."""
    config = config.for_workflow(workflow)
    return BudgetHandle(config, budget_actor(config))


class BudgetAdmission:
    def __init__(
        self,
        config: BudgetConfig,
        workflow: WorkflowSpec,
        actor: Any = None,
        clock: Clock = SYSTEM_CLOCK,
        sync_interval_s: float = 0.5,
    ) -> None:
        self._config = config
        self._workflow = workflow
        self._actor = actor
        self._clock = clock
        self._sync_interval_s = sync_interval_s
        self._specs: dict[tuple[str, str], list[BucketSpec]] = {}
        buckets: dict[str, tuple[float, float]] = {}
        for step in workflow.steps:
            for choice in step.models:
                for spec in self._buckets(choice.provider, choice.model):
                    buckets[spec.key] = (spec.capacity, spec.rate_per_s)
        self._planner = AdmissionPlanner(buckets, config.weight, clock.monotonic(), margin=config.admission_margin)
        self._need: dict[str, dict[str, float]] = {s.id: self._first_guess(s) for s in workflow.steps}
        first_latency = {s.id: s.models[0].expected_latency_s for s in workflow.steps}
        self._dag = Dag.from_spec(workflow)
        # The latency priors are medians: leave room for the tail.
        self._prior_path_s = config.admission_latency_factor * self._dag.critical_path(first_latency)[1]
        self._observed_paths: deque[float] = deque(maxlen=OBSERVED_RUNS)
        self._observed_p95 = 0.0
        self._late_scale = 1.0
        self._sync_task: asyncio.Task[None] | None = None
        self.refused = 0
        self.admitted = 0

    @property
    def critical_path_s(self) -> float:
        """How long before its deadline a run must have its tokens: the critical path's latency (prior,
        or the p95 observed on finished runs if longer), stretched while admitted runs come in late."""
        return max(self._prior_path_s, PATH_MARGIN * self._observed_p95) * self._late_scale

    def _buckets(self, provider: str, model: str) -> list[BucketSpec]:
        key = (provider, model)
        if key not in self._specs:
            self._specs[key] = self._config.buckets_for(provider, model)
        return self._specs[key]

    def _first_guess(self, step: StepSpec) -> dict[str, float]:
        choice = step.models[0]
        text = (choice.prompt or step.prompt) + (choice.system or step.system or "")
        references = len(_REFERENCE.findall(text))
        prompt = estimate_tokens(_REFERENCE.sub("", text)) + 8 + TOKENS_PER_INPUT_GUESS * references
        ask = SpendAsk(input_tokens=prompt, max_output_tokens=choice.max_tokens)
        return {spec.key: reserve_amount(spec, ask) for spec in self._buckets(choice.provider, choice.model)}

    def run_need(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for need in self._need.values():
            for key, amount in need.items():
                total[key] = total.get(key, 0.0) + amount
        return total

    async def admit(
        self, run_id: str, workflow: WorkflowSpec, options: RunOptions, deadline: RunDeadline
    ) -> str | None:
        self._ensure_sync()
        now = self._clock.monotonic()
        latest = now + deadline.remaining() - self.critical_path_s
        refusal = self._planner.admit(run_id, options.tenant, self.run_need(), latest, now)
        if refusal is None:
            self.admitted += 1
            return None
        self.refused += 1
        metrics.count("tailrace_budget_refusals_total", "Reservations refused, by reason", {"reason": "admission"})
        return f"budget_exhausted at submission: {refusal}"

    def finished(self, run_id: str, outcome: RunOutcome) -> None:
        """Replace the run's planned need with what its attempts were charged; learn from it."""
        per_step: dict[str, dict[str, float]] = {}
        for a in outcome.attempts:
            step = self._workflow.step(a.step_id)
            choice = step.models[a.tier] if a.tier < len(step.models) else step.models[0]
            ask = SpendAsk(input_tokens=a.input_tokens, max_output_tokens=choice.max_tokens)
            used = Usage(
                a.input_tokens,
                a.output_tokens,
                a.cost_usd,
                reported=a.usage_reported,
                cancelled=a.outcome == AttemptOutcome.CANCELLED,
            )
            charged = per_step.setdefault(a.step_id, {})
            for spec in self._buckets(a.provider, a.model):
                charges = spec.charges or "admission"
                charged[spec.key] = charged.get(spec.key, 0.0) + settled_amount(spec, charges, ask, used)
        used_total: dict[str, float] = {}
        for charged in per_step.values():
            for key, amount in charged.items():
                used_total[key] = used_total.get(key, 0.0) + amount
        self._planner.done(run_id, used_total, self._clock.monotonic())
        self._learn_latency(outcome)
        if outcome.delivered:
            for step_id, charged in per_step.items():
                learned = self._need[step_id]
                for key in set(learned) | set(charged):
                    learned[key] = (1 - LEARNING_RATE) * learned.get(key, 0.0) + LEARNING_RATE * charged.get(key, 0.0)

    def _learn_latency(self, outcome: RunOutcome) -> None:
        """Slow providers or a starved machine make runs slower than the priors say: learn the critical
        path from the winning attempts, and back off (multiplicatively) when admitted runs are late."""
        winners = {a.step_id: a.latency_s for a in outcome.attempts if a.outcome == AttemptOutcome.VALID}
        if outcome.delivered and len(winners) == len(self._workflow.steps):
            self._observed_paths.append(self._dag.critical_path(winners)[1])
            if len(self._observed_paths) >= 20 and len(self._observed_paths) % 10 == 0:
                ordered = sorted(self._observed_paths)
                self._observed_p95 = ordered[int(0.95 * (len(ordered) - 1))]
        if outcome.failure == FailureReason.DEADLINE_EXCEEDED:
            self._late_scale = min(MAX_LATE_SCALE, self._late_scale * 1.25)
        elif outcome.on_time:
            self._late_scale = max(1.0, self._late_scale * 0.99)

    # ---- the real ledger lowers the plan ---------------------------------------------------------

    def _ensure_sync(self) -> None:
        if self._actor is None or (self._sync_task is not None and not self._sync_task.done()):
            return
        with contextlib.suppress(RuntimeError):
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a slow or restarting actor: plan on, sync later
                status: LedgerStatus = await wait_for(self._actor.status.remote(), Deadline.after(2.0, self._clock))
                now = self._clock.monotonic()
                for key, b in status.buckets.items():
                    self._planner.sync(key, max(0.0, b.level) + b.outstanding, now)
            await self._clock.sleep(self._sync_interval_s)

    def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()


# ---- tenants' spend ------------------------------------------------------------------------------


def budget_status(
    *,
    address: str | None = None,
    name: str = "tailrace-budget",
    redis_url: str | None = None,
    namespace: str = "default",
    day: str | None = None,
) -> LedgerStatus:
    """Buckets and tenants' recorded spend for a UTC day (today by default): from Redis directly when
    `redis_url` is given (no cluster needed), else from the running cluster's budget actor."""
    day = day or utc_day(SYSTEM_CLOCK.time())
    if redis_url is not None:
        config = BudgetConfig(redis_url=redis_url, namespace=namespace)

        async def read() -> LedgerStatus:
            ledger = RedisLedger(redis_url, namespace, config.bucket)
            try:
                return await ledger.status(day, SYSTEM_CLOCK.time())
            finally:
                await ledger.aclose()

        return asyncio.run(read())
    import ray

    from tailrace.cluster.connection import connect_existing

    connect_existing(address)  # a running cluster's actor: never start a throwaway cluster to ask it
    actor = find_budget_actor(name)
    if actor is None:
        raise LookupError(f"no budget actor named {name!r} is running on this cluster")
    return ray.get(actor.status.remote(day), timeout=30)


def spend_rows(status: LedgerStatus) -> list[dict[str, Any]]:
    return [{"tenant": t, **vars(s)} for t, s in sorted(status.spend.items())]


def bucket_rows(status: LedgerStatus) -> list[dict[str, Any]]:
    rows = []
    for key, b in sorted(status.buckets.items()):
        per_min = b.rate_per_s * 60 if b.rate_per_s > 0 else math.nan
        rows.append(
            {
                "bucket": key,
                "capacity": b.capacity,
                "per_minute": per_min,
                "free": b.level,
                "leased": b.outstanding,
                "utilisation": b.utilisation,
                "written_off": b.written_off,
                "clamped": b.clamped,
            }
        )
    return rows
