"""The budget ledger behind the budget actor: in memory (`MemoryLedger`) or in Redis (`RedisLedger`).

Both run the same `exchange` (see `tailrace.policies.leases`); the Redis one runs it as one Lua script, so
the update is atomic however many budget actors (clusters) share the account, and the state
survives the actor: a restarted actor resumes without forgetting spend, and an exchange retried
after a lost reply is answered from the stored reply (idempotent per report id), never applied
twice. Time is the caller's wall clock (epoch seconds): budget actors on different machines agree
to within NTP's few milliseconds, which is all refill arithmetic needs.

Secrets: the Redis URL (password inside) is never logged or put in an error; errors name the
redacted URL only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailrace.policies.budget_config import redact_url
from tailrace.policies.leases import (
    BucketOp,
    BucketView,
    ExchangeReply,
    ExchangeRequest,
    LeaseBook,
    Resolver,
    SpendTotals,
)

log = logging.getLogger("tailrace.budget")

REPLY_TTL_S = 600  # how long a reply is kept for a retried exchange
KEY_PREFIX = "tailrace:budget"
_LUA = (Path(__file__).with_name("budget_exchange.lua")).read_text()


class LedgerUnavailable(Exception):
    """The shared ledger cannot be reached (the message never carries a secret)."""


@dataclass(frozen=True)
class BucketStatus:
    capacity: float
    rate_per_s: float
    level: float
    outstanding: float
    granted: float = 0.0
    spent: float = 0.0
    returned: float = 0.0
    written_off: float = 0.0
    clamped: float = 0.0
    debited: float = 0.0  # used beyond any grant (under-estimates, use during a Redis outage)

    @property
    def unreconciled(self) -> float:
        """granted - (spent + returned + written_off + outstanding): 0 while the ledger adds up."""
        return self.granted - (self.spent + self.returned + self.written_off + self.outstanding)

    @property
    def utilisation(self) -> float:
        return min(1.0, max(0.0, 1.0 - self.level / self.capacity)) if self.capacity > 0 else 1.0


@dataclass(frozen=True)
class LedgerStatus:
    backend: str  # memory | redis | redis-degraded
    day: str
    buckets: dict[str, BucketStatus] = field(default_factory=dict)
    spend: dict[str, SpendTotals] = field(default_factory=dict)  # tenant -> today's recorded spend
    leases: int = 0
    redis: str | None = None  # redacted URL


def outage_debits(book: LeaseBook) -> dict[str, BucketOp]:
    """What a local fallback ledger's executors used while the shared one was away, per bucket, to charge
    the shared ledger with when it is back: granted less returned (spent, written off, or still held by
    local leases, which the shared ledger never saw and its executors will find lost), plus debits."""
    used = {key: b.granted_total - b.returned_total + b.debited_total for key, b in book.buckets.items()}
    return {key: BucketOp(debit=amount) for key, amount in used.items() if amount > 1e-9}


class MemoryLedger:
    """`LeaseBook` behind a lock: the admin concurrency group reads it from another thread."""

    backend = "memory"

    def __init__(self, resolve: Resolver, *, start_full: bool = True, scale: float = 1.0) -> None:
        self.book = LeaseBook(resolve, start_full=start_full, scale=scale)
        self._lock = threading.Lock()

    async def exchange(self, req: ExchangeRequest, now: float, new_lease_id: str) -> ExchangeReply:
        with self._lock:
            return self.book.exchange(req, now, new_lease_id)

    async def status(self, day: str, now: float) -> LedgerStatus:
        with self._lock:
            self.book.expire(now)
            buckets = {}
            for key, b in self.book.buckets.items():
                b.refill(now)
                buckets[key] = BucketStatus(
                    b.capacity,
                    b.rate_per_s,
                    b.level,
                    b.outstanding,
                    b.granted_total,
                    b.spent_total,
                    b.returned_total,
                    b.written_off_total,
                    b.clamped_total,
                    b.debited_total,
                )
            spend = {t: dataclasses.replace(s) for (d, t), s in self.book.spend.items() if d == day}
            return LedgerStatus(self.backend, day, buckets, spend, len(self.book.leases))

    async def aclose(self) -> None:
        return None


def _request_json(
    req: ExchangeRequest,
    now: float,
    new_lease_id: str,
    prefix: str,
    resolve: Resolver,
    start_full: bool,
    expect_state: bool = False,
) -> str:
    ops = {}
    for key, op in req.ops.items():
        spec = resolve(key)
        if spec is None:
            continue  # a bucket this ledger has no limit for: nothing to grant or count
        ops[key] = {**dataclasses.asdict(op), "capacity": spec.capacity, "rate": spec.rate_per_s}
    feedback = {}
    for key, fb in req.feedback.items():
        spec = resolve(key)
        if spec is not None:
            feedback[key] = {
                "remaining": fb.remaining,
                "blocked_s": fb.blocked_s,
                "capacity": spec.capacity,
                "rate": spec.rate_per_s,
            }
    return json.dumps(
        {
            "prefix": prefix,
            "now": now,
            "new_lease_id": new_lease_id,
            "executor": req.executor,
            "report_id": req.report_id,
            "lease_id": req.lease_id or "",
            "ttl": req.ttl_s,
            "close": req.close,
            "exact": req.exact,
            "day": req.day,
            "ops": ops,
            "feedback": feedback,
            "reply_ttl": REPLY_TTL_S,
            "start_full": start_full,
            "expect_state": expect_state,
            "spend": {t: d.as_dict() for t, d in req.spend.items()},
        }
    )


def _reply(raw: Any) -> ExchangeReply:
    data = json.loads(raw)
    buckets = data.get("buckets") or {}
    return ExchangeReply(
        lease_id=data["lease_id"],
        lost=bool(data["lost"]),
        granted={k: float(v) for k, v in (data.get("granted") or {}).items()},
        buckets={
            k: BucketView(
                float(v["capacity"]),
                float(v["rate"]),
                float(v["level"]),
                float(v["outstanding"]),
                float(v["blocked_s"]),
            )
            for k, v in buckets.items()
        },
        ttl_s=float(data["ttl"]),
    )


class RedisLedger:
    """The ledger in Redis: one Lua script per exchange (atomic across budget actors)."""

    backend = "redis"

    def __init__(
        self, url: str, namespace: str, resolve: Resolver, *, timeout_s: float = 0.5, start_full: bool = True
    ) -> None:
        import redis.asyncio as aioredis

        self._redacted = redact_url(url)
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._script = self._client.register_script(_LUA)
        # A hash tag keeps every key of one namespace on one Redis Cluster slot.
        self.prefix = f"{KEY_PREFIX}:{{{namespace}}}:"
        self._resolve = resolve
        self._start_full = start_full
        self._seen_state = False  # after one exchange: a namespace missing from Redis means it came back empty

    def __repr__(self) -> str:
        return f"RedisLedger({self._redacted}, prefix={self.prefix!r})"

    async def _call(self, coro: Any) -> Any:
        import redis.exceptions as rexc

        try:
            return await coro
        except (rexc.ConnectionError, rexc.TimeoutError, TimeoutError, OSError) as exc:
            raise LedgerUnavailable(f"Redis at {self._redacted} unreachable ({type(exc).__name__})") from None
        except rexc.AuthenticationError:
            raise LedgerUnavailable(f"Redis at {self._redacted} refused the credentials") from None
        except rexc.ResponseError as exc:
            raise LedgerUnavailable(f"Redis at {self._redacted} error: {str(exc)[:200]}") from None

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def exchange(self, req: ExchangeRequest, now: float, new_lease_id: str) -> ExchangeReply:
        payload = _request_json(
            req, now, new_lease_id, self.prefix, self._resolve, self._start_full, expect_state=self._seen_state
        )
        reply = _reply(await self._call(self._script(keys=[], args=[payload])))
        self._seen_state = True
        return reply

    async def status(self, day: str, now: float) -> LedgerStatus:
        # Expire dead leases first, so `outstanding` is what live executors hold.
        await self.exchange(ExchangeRequest(executor="status", report_id="", close=True), now, "status")
        p = self.prefix
        keys = sorted(
            k.decode() if isinstance(k, bytes) else k for k in await self._call(self._client.smembers(p + "buckets"))
        )
        buckets = {}
        for key in keys:
            h = {_s(k): float(v) for k, v in (await self._call(self._client.hgetall(p + "b:" + key))).items()}
            if not h:
                continue
            room, level = h["capacity"] - h["outstanding"], h["level"]
            if level < room:
                level = min(room, level + max(0.0, now - h["last"]) * h["rate"])
            buckets[key] = BucketStatus(
                h["capacity"],
                h["rate"],
                level,
                h["outstanding"],
                h.get("granted", 0.0),
                h.get("spent", 0.0),
                h.get("returned", 0.0),
                h.get("written_off", 0.0),
                h.get("clamped", 0.0),
                h.get("debited", 0.0),
            )
        spend = {}
        for tenant in await self._call(self._client.smembers(f"{p}tenants:{day}")):
            tenant = _s(tenant)
            h = {_s(k): float(v) for k, v in (await self._call(self._client.hgetall(f"{p}s:{day}:{tenant}"))).items()}
            spend[tenant] = SpendTotals(
                h.get("usd", 0.0),
                *(
                    int(h.get(f, 0))
                    for f in ("input_tokens", "output_tokens", "attempts", "cancelled", "wasted_tokens")
                ),
            )
        leases = await self._call(self._client.zcard(p + "leases"))
        return LedgerStatus(self.backend, day, buckets, spend, int(leases), self._redacted)

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a client whose server is gone: nothing left to release
            log.debug("closing the Redis client of %s: %s", self._redacted, type(exc).__name__)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
