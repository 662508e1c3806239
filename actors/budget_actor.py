"""The budget actor: one per cluster (Ray namespace `tailrace`, named), holding the ledger every
executor leases from.

It is off the hot path: executors call `exchange` a few times a second each (report, return, top
up), never per attempt. It sizes grants by demand (`DemandBoard`), so a scarce bucket is shared in
proportion to what executors want, and tells executors holding more than their share to return it.

With `redis_url` the ledger lives in Redis: a restarted actor resumes where it was; two clusters
(two actors) on one Redis enforce one limit. If Redis becomes unreachable the actor fails safe: it
serves from a local ledger at `redis_fallback_fraction` of each limit, starting empty, and probes
Redis every second; when Redis is back it charges Redis with what was used meanwhile (granted less
returned: spent, written off, or still held by leases Redis never saw, which it writes off) and
replays the spend recorded meanwhile (idempotently), then switches back. A Redis that came back
empty (restarted without its data) gets its buckets created dry, not full. Without Redis the ledger
is in memory; a restarted actor then starts every bucket empty, since it forgot recent spend.

Supervision: Ray restarts the actor after a crash (`max_restarts=-1`). Killed for good (`ray.kill`,
a lost node), whoever notices first -- an executor's `ActorLedgerClient` or the driver's admission --
creates a replacement under the same name (`revive_budget_actor`), dry unless its state is in Redis;
executors spend their leases meanwhile.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayError

from tailrace.engine.clock import SYSTEM_CLOCK, Clock, Deadline, wait_for
from tailrace.policies.budget_config import BucketSpec, BudgetConfig, utc_day
from tailrace.policies.leases import BucketView, DemandBoard, ExchangeReply, ExchangeRequest, SpendDelta
from tailrace.runtime import metrics
from tailrace.runtime.budget_ledger import LedgerStatus, LedgerUnavailable, MemoryLedger, RedisLedger, outage_debits
from tailrace.runtime.direct_gate import DirectGate
from tailrace.runtime.lease_gate import LeasePool

log = logging.getLogger("tailrace.budget")

RAY_NAMESPACE = "tailrace"
PROBE_INTERVAL_S = 1.0
REVIVE_INTERVAL_S = 1.0  # an executor tries to replace a dead budget actor at most this often
METRICS_INTERVAL_S = 1.0


@ray.remote(concurrency_groups={"admin": 1}, max_restarts=-1, max_task_retries=0)
class BudgetActor:
    def __init__(self, config: BudgetConfig, clock: Clock = SYSTEM_CLOCK, replacing: bool = False) -> None:
        self._config = config
        self._clock = clock
        # Restarted by Ray, or created to replace one that died: recent spend is forgotten (unless in Redis).
        restarted = ray.get_runtime_context().was_current_actor_reconstructed or replacing
        self.restarts_seen = int(restarted)
        self._board = DemandBoard(ttl_s=config.lease_ttl_s)
        self._free: dict[str, float] = {}
        self._views: dict[str, tuple[BucketView, float]] = {}  # the last view of each bucket, and when
        self._redis: RedisLedger | None = None
        self._memory: MemoryLedger | None = None
        if config.redis_url is not None:
            self._redis = RedisLedger(
                config.redis_url.get_secret_value(), config.namespace, self._resolve, timeout_s=config.redis_timeout_s
            )
        else:
            # A restarted in-memory ledger forgot recent spend: start dry rather than open.
            self._memory = MemoryLedger(self._resolve, start_full=not restarted)
        self._fallback: MemoryLedger | None = None
        self._fallback_spend: list[tuple[str, str, dict[str, SpendDelta]]] = []
        self._next_probe = 0.0
        self._admin_redis: RedisLedger | None = None
        self._exchanges = 0
        self._last_metrics = 0.0
        self._metrics_errors = 0

    def _resolve(self, key: str) -> BucketSpec | None:
        return self._config.bucket(key)

    # ---- the hot-ish path: executors' reports and top-ups ---------------------------------------------

    async def exchange(self, req: ExchangeRequest) -> ExchangeReply:
        now = self._clock.time()
        targets: dict[str, float] = {}
        wants = {k: op.want for k, op in req.ops.items() if op.want > 0}
        if req.close:
            self._board.forget(req.executor)
        elif wants and not req.exact:
            self._board.report(req.executor, wants, req.balances, now)
            capped, targets = self._board.cap(req.executor, wants, self._free, now)
            req = replace(req, ops={k: replace(op, want=capped.get(k, op.want)) for k, op in req.ops.items()})
        reply = await self._exchange(req, now)
        if reply.granted and not req.exact:
            self._board.granted(req.executor, reply.granted, now)
        for key, view in reply.buckets.items():
            self._free[key] = max(0.0, view.level) if view.blocked_s <= 0 else 0.0
            self._views[key] = (view, now)
        self._exchanges += 1
        if now - self._last_metrics >= METRICS_INTERVAL_S:
            self._last_metrics = now
            try:
                self._export_metrics(reply, now)
            except Exception:  # metrics are never worth a failed exchange: log and count
                self._metrics_errors += 1
                log.warning("budget metrics export failed (%d so far)", self._metrics_errors, exc_info=True)
        return replace(reply, targets=targets, degraded=self._fallback is not None)

    async def _exchange(self, req: ExchangeRequest, now: float) -> ExchangeReply:
        new_id = uuid.uuid4().hex
        if self._redis is None:
            assert self._memory is not None
            return await self._memory.exchange(req, now, new_id)
        if self._fallback is None or now >= self._next_probe:
            try:
                if self._fallback is not None:
                    await self._redis.ping()
                    await self._resync(now)
                return await self._redis.exchange(req, now, new_id)
            except LedgerUnavailable as exc:
                if self._fallback is None:
                    log.warning(
                        "budget ledger degraded to a local limit of %.0f%%: %s",
                        100 * self._config.redis_fallback_fraction,
                        exc,
                    )
                    self._fallback = MemoryLedger(
                        self._resolve, start_full=False, scale=self._config.redis_fallback_fraction
                    )
                self._next_probe = now + PROBE_INTERVAL_S
        assert self._fallback is not None
        if req.spend and req.report_id not in self._fallback.book._replies:
            self._fallback_spend.append((req.report_id, req.day, dict(req.spend)))
        return await self._fallback.exchange(req, now, new_id)

    async def _resync(self, now: float) -> None:
        """Redis is back: charge it with what was used during the outage -- granted less returned, i.e.
        spent, written off, or still held by local leases (Redis never saw those: executors find them
        lost and give back what their attempts did not use as refunds) -- as debits, outside Redis's own
        grants, so its ledger still adds up; then replay the spend recorded meanwhile under its original
        report ids (idempotent)."""
        assert self._redis is not None and self._fallback is not None
        debits = outage_debits(self._fallback.book)
        if debits:
            await self._redis.exchange(
                ExchangeRequest(executor="resync", report_id=f"resync-{uuid.uuid4().hex}", ops=debits, close=True),
                now,
                "resync",
            )
        while self._fallback_spend:
            report_id, day, spend = self._fallback_spend[0]
            await self._redis.exchange(
                ExchangeRequest(executor="resync", report_id=report_id, spend=spend, day=day, close=True), now, "resync"
            )
            self._fallback_spend.pop(0)
        log.warning("budget ledger back on Redis; %d buckets charged for the outage", len(debits))
        self._fallback = None

    def _export_metrics(self, reply: ExchangeReply, now: float) -> None:
        for key, view in reply.buckets.items():
            label = key.rsplit(":", 1)[0] if key.startswith("usd:") else key
            used = 1.0 - max(0.0, view.level) / view.capacity if view.capacity > 0 else 1.0
            metrics.gauge(
                "tailrace_budget_bucket_utilisation",
                "Fraction of a bucket not free for new grants",
                {"bucket": label},
                min(1.0, max(0.0, used)),
            )
            metrics.gauge(
                "tailrace_budget_bucket_leased",
                "Amount of a bucket held by live leases",
                {"bucket": label},
                view.outstanding,
            )
        metrics.gauge(
            "tailrace_budget_leases",
            "Executors holding a live lease (this actor's view)",
            {},
            len(self._board.live(now)),
        )
        metrics.gauge(
            "tailrace_budget_degraded",
            "1 while the shared ledger is unreachable",
            {},
            1.0 if self._fallback is not None else 0.0,
        )

    async def free_for_planning(self) -> dict[str, tuple[float, float]]:
        """Per bucket, (unspent, in flight): what is not spent -- the free level, refilled since the last
        exchange, plus every lease -- and how much of the leases attempts in flight hold now (leases less
        what live executors last reported holding unreserved). The provider holds an attempt's whole
        max_tokens until it ends, so admission sets what is in flight aside while it is."""
        now = self._clock.time()
        unreserved: dict[str, float] = {}
        for _, held in self._board.live(now).values():
            for key, amount in held.items():
                unreserved[key] = unreserved.get(key, 0.0) + max(0.0, amount)
        out = {}
        for key, (view, at) in self._views.items():
            since = max(0.0, now - at)
            if view.blocked_s > since:
                level = 0.0
            else:
                level = min(view.capacity - view.outstanding, max(0.0, view.level) + view.rate_per_s * since)
            in_flight = max(0.0, view.outstanding - unreserved.get(key, 0.0))
            out[key] = (level + view.outstanding, in_flight)
        return out

    # ---- admin ------------------------------------------------------------------------------------

    async def configure(self, config: BudgetConfig) -> None:
        """Add a workflow's limits and tenants (the ledger's location never changes)."""
        self._config = self._config.merged(config)

    def config(self) -> BudgetConfig:
        return self._config

    @ray.method(concurrency_group="admin")
    async def status(self, day: str | None = None) -> LedgerStatus:
        """Buckets, live leases and tenants' recorded spend for one UTC day (today by default)."""
        now = self._clock.time()
        day = day or utc_day(now)
        if self._redis is None:
            assert self._memory is not None
            return await self._memory.status(day, now)
        fallback = self._fallback
        try:
            if self._admin_redis is None:  # this group has its own event loop: its own client
                cfg = self._config
                assert cfg.redis_url is not None
                self._admin_redis = RedisLedger(
                    cfg.redis_url.get_secret_value(), cfg.namespace, self._resolve, timeout_s=cfg.redis_timeout_s
                )
            status = await self._admin_redis.status(day, now)
            return replace(status, backend="redis-degraded" if fallback is not None else "redis")
        except LedgerUnavailable:
            if fallback is None:
                raise
            status = await fallback.status(day, now)
            return replace(status, backend="redis-degraded", redis=self._config.redacted_redis_url())

    @ray.method(concurrency_group="admin")
    async def health(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "backend": "redis" if self._redis is not None else "memory",
            "degraded": self._fallback is not None,
            "exchanges": self._exchanges,
            "metrics_errors": self._metrics_errors,
            "restarted": bool(self.restarts_seen),
            "redis": self._config.redacted_redis_url(),
        }


class ActorLedgerClient:
    """How an executor reaches the budget actor. Any failure (dead, restarting, slow) is
    `LedgerUnavailable`: the executor keeps its report and sends the same one again. An actor that
    died for good is looked up again by name, and replaced if nobody has replaced it yet."""

    def __init__(self, actor: Any, config: BudgetConfig | None = None, timeout_s: float = 5.0) -> None:
        self._actor = actor
        self._config = config
        self._timeout_s = timeout_s
        self._next_revive = 0.0
        self.revived = 0

    async def exchange(self, req: ExchangeRequest) -> ExchangeReply:
        try:
            return await wait_for(self._actor.exchange.remote(req), Deadline.after(self._timeout_s, SYSTEM_CLOCK))
        except ActorDiedError as exc:
            await self._replace()
            raise LedgerUnavailable(f"budget actor died ({type(exc).__name__}); replaced: {self.revived}") from None
        except (RayActorError, GetTimeoutError, TimeoutError, RayError) as exc:
            raise LedgerUnavailable(f"budget actor unavailable ({type(exc).__name__})") from None

    async def _replace(self) -> None:
        now = SYSTEM_CLOCK.monotonic()
        if self._config is None or now < self._next_revive:
            return
        self._next_revive = now + REVIVE_INTERVAL_S
        try:
            self._actor = await revive_budget_actor(self._config)
            self.revived += 1
        except (RayError, TimeoutError, ValueError) as exc:
            log.warning("could not replace the budget actor %r: %s", self._config.actor_name, type(exc).__name__)


@dataclass(frozen=True)
class BudgetHandle:
    """What an executor needs to build its gate: the config and the actor (both picklable)."""

    config: BudgetConfig
    actor: Any

    def executor_gate(self, executor_id: str) -> LeasePool | DirectGate:
        client = ActorLedgerClient(self.actor, self.config)
        if self.config.mode == "direct":
            return DirectGate(self.config, client, executor_id)
        return LeasePool(self.config, client, executor_id)


def _options(config: BudgetConfig) -> dict[str, Any]:
    return {
        "name": config.actor_name,
        "namespace": RAY_NAMESPACE,
        "get_if_exists": True,
        "lifetime": "detached",
        "num_cpus": 0,
        "max_concurrency": 1000,
    }


def budget_actor(config: BudgetConfig) -> Any:
    """Find the cluster's budget actor by name, or create it; then make sure it knows `config`'s limits."""
    actor = BudgetActor.options(**_options(config)).remote(config)  # type: ignore[attr-defined]
    ray.get(actor.configure.remote(config))
    return actor


async def revive_budget_actor(config: BudgetConfig, within_s: float = 10.0) -> Any:
    """The budget actor died for good: the live one under its name (someone replaced it already), else
    a replacement, which starts dry unless its ledger is in Redis."""
    try:
        actor = BudgetActor.options(**_options(config)).remote(config, replacing=True)  # type: ignore[attr-defined]
    except ValueError:  # created by someone else at the same moment
        actor = ray.get_actor(config.actor_name, namespace=RAY_NAMESPACE)
    await wait_for(actor.configure.remote(config), Deadline.after(within_s, SYSTEM_CLOCK))
    log.warning("budget actor %r replaced", config.actor_name)
    return actor


def find_budget_actor(name: str = "tailrace-budget") -> Any:
    """The running budget actor, or None."""
    try:
        return ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        return None
