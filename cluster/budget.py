"""The cluster budget from the driver's side: find or create the budget actor, refuse runs at
submission that cannot be served before their deadline, and report tenants' spend.

`BudgetAdmission` is the driver's `RunAdmission`. It decides from a local plan
(`tailrace.policies.admission.AdmissionPlanner`), so a refusal takes microseconds, not an actor round
trip. It refuses only on evidence: tokens that cannot be had before the run's deadline, planned with
what runs of the workflow really use (`tailrace.policies.run_profile.RunProfile`: per step, learned from
delivered runs; before any, what the provider takes at admission), or a critical path measured on
finished runs. The latency priors of the spec are never a reason to refuse. In the background it lowers the plan to what
the budget actor says is really free (another cluster on the same account, provider feedback) and
supervises the actor: one that died for good is replaced; while no budget can be had at all, runs are
refused at once, saying why.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from ray.exceptions import ActorDiedError, RayError

from tailrace.actors.budget_actor import BudgetHandle, budget_actor, find_budget_actor, revive_budget_actor
from tailrace.engine.clock import SYSTEM_CLOCK, Clock, Deadline, RunDeadline, wait_for
from tailrace.engine.outcomes import RunOutcome
from tailrace.engine.specs import RunOptions, WorkflowSpec
from tailrace.policies.admission import AdmissionPlanner, Part
from tailrace.policies.budget_config import BucketSpec, BudgetConfig, Charges, utc_day
from tailrace.policies.run_profile import RunProfile, per_bucket_total
from tailrace.runtime import metrics
from tailrace.runtime.budget_ledger import LedgerStatus, RedisLedger

log = logging.getLogger("tailrace.budget")

SYNC_TIMEOUT_S = 2.0


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
        self._specs: dict[tuple[str, str], list[tuple[BucketSpec, Charges]]] = {}
        buckets: dict[str, tuple[float, float]] = {}
        for step in workflow.steps:
            for choice in step.models:
                for spec, _ in self._buckets(choice.provider, choice.model):
                    buckets[spec.key] = (spec.capacity, spec.rate_per_s)
        self._planner = AdmissionPlanner(buckets, config.weight, clock.monotonic(), margin=config.admission_margin)
        self.profile = RunProfile(workflow, self._buckets, config.admission_latency_factor)
        self._sync_task: asyncio.Task[None] | None = None
        # The ledger's health, as the sync loop sees it: no budget can be had while it stays unreachable.
        self._last_sync = clock.monotonic()
        self._sync_error: str | None = None
        self.sync_failures = 0
        self.replaced = 0
        self.refused = 0
        self.admitted = 0

    @property
    def critical_path_s(self) -> float:
        """How long runs take once they have their tokens: measured on finished runs (0 before any)."""
        return self.profile.critical_path_s(self._clock.monotonic())

    def _buckets(self, provider: str, model: str) -> list[tuple[BucketSpec, Charges]]:
        key = (provider, model)
        if key not in self._specs:
            specs = self._config.buckets_for(provider, model)
            self._specs[key] = [(spec, spec.charges or "usage") for spec in specs]
        return self._specs[key]

    def run_need(self) -> dict[str, float]:
        return self.profile.run_need()

    def _unreachable_for(self, now: float) -> float:
        """Seconds the ledger has not answered, once past `ledger_timeout_s` (no lease is live by then)."""
        if self._actor is None or self._sync_error is None:
            return 0.0
        silent = now - self._last_sync
        return silent if silent > max(self._config.ledger_timeout_s, self._config.lease_ttl_s) else 0.0

    async def admit(
        self, run_id: str, workflow: WorkflowSpec, options: RunOptions, deadline: RunDeadline
    ) -> str | None:
        self._ensure_sync()
        now = self._clock.monotonic()
        refusal = self._decide(run_id, options.tenant, deadline, now)
        if refusal is None:
            self.admitted += 1
            return None
        self.refused += 1
        metrics.count("tailrace_budget_refusals_total", "Reservations refused, by reason", {"reason": "admission"})
        return f"budget_exhausted at submission: {refusal}"

    def _decide(self, run_id: str, tenant: str, deadline: RunDeadline, now: float) -> str | None:
        silent = self._unreachable_for(now)
        if silent:
            return (
                f"no budget can be had: the budget actor {self._config.actor_name!r} has not answered for "
                f"{silent:.1f} s ({self._sync_error}; replaced {self.replaced} times)"
            )
        remaining = deadline.remaining() - deadline.return_margin_s
        path = self.profile.critical_path_s(now)
        if not self.profile.cold and remaining < path:
            return (
                f"the deadline leaves {max(0.0, remaining):.2f} s; runs of this workflow take {path:.2f} s once "
                f"they have their tokens (measured on {self.profile.finished_runs()} finished runs)"
            )
        tails = self.profile.tails(now, remaining)
        parts = [
            Part(now + remaining - tails[s.id], self.profile.step_need(s.id), f"step {s.id!r}")
            for s in self._workflow.steps
        ]
        refusal = self._planner.admit(run_id, tenant, parts, now)
        if refusal is None:
            return None
        return f"{refusal} (need per run: {self.profile.describe()})"

    def finished(self, run_id: str, outcome: RunOutcome) -> None:
        """Replace the run's planned need with what its attempts were charged; learn from it."""
        charged = self.profile.charged(outcome)
        self._planner.done(run_id, per_bucket_total(charged), self._clock.monotonic())
        self.profile.learn(outcome, self._clock.monotonic())

    # ---- the real ledger lowers the plan; a dead actor is replaced -------------------------------

    def _ensure_sync(self) -> None:
        if self._actor is None or (self._sync_task is not None and not self._sync_task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): plan without syncing
        self._sync_task = loop.create_task(self._sync_forever())

    async def sync_once(self) -> None:
        try:
            free: dict[str, tuple[float, float]] = await wait_for(
                self._actor.free_for_planning.remote(), Deadline.after(SYNC_TIMEOUT_S, self._clock)
            )
        except ActorDiedError as exc:
            self._failed(f"{type(exc).__name__}: the actor died")
            await self._replace()
            return
        except (RayError, TimeoutError) as exc:
            self._failed(type(exc).__name__)
            return
        now = self._clock.monotonic()
        self._last_sync, self._sync_error = now, None
        for key, (unspent, in_flight) in free.items():
            # The plan counted what in-flight attempts use; the provider holds their whole reservation.
            self._planner.sync(key, unspent, now, held=in_flight * self.profile.worst_case_share(key))

    def _failed(self, why: str) -> None:
        self.sync_failures += 1
        if self._sync_error is None:
            log.warning("budget admission: the budget actor did not answer (%s)", why)
        self._sync_error = why

    async def _replace(self) -> None:
        try:
            self._actor = await revive_budget_actor(self._config)
            self.replaced += 1
        except (RayError, TimeoutError, ValueError) as exc:
            self._failed(f"could not replace the budget actor: {type(exc).__name__}")

    async def _sync_forever(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception as exc:  # a bug must not stop the sync silently: logged, counted, retried
                self._failed(f"internal error: {type(exc).__name__}")
                log.exception("budget admission sync error")
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
                "debited": b.debited,
                "granted": b.granted,
                "spent": b.spent,
                "returned": b.returned,
                "unreconciled": b.unreconciled,
            }
        )
    return rows
