"""Lease arithmetic: slices of the global buckets handed to executors for a short TTL.

An executor does not ask the ledger for every attempt. It holds a *lease*: an amount of each
bucket it may spend locally until the lease's expiry, topped up ahead of need and returned when
idle. All of it goes through one operation, `exchange`: report what was spent, return what is not
needed, apply provider feedback, and receive new grants, atomically. An `exchange` is idempotent
per `report_id`, so a caller that lost the reply (the ledger restarted) can simply send it again.

The global limit holds at all times because every lease is taken out of a bucket whose
`level + outstanding <= capacity` (see `tailrace.policies.buckets`). A lease that expires unreturned (its
executor died) is written off as spent: conservative, never double-counted.

`LeaseBook` is the in-memory ledger; the Redis ledger (`tailrace.actors.budget_redis`) runs the same steps in
Lua. `DemandBoard` splits a scarce bucket between executors by what they want, so the first to
ask cannot take everything. Pure: time is a `now` argument.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tailrace.policies.buckets import TokenBucket
from tailrace.policies.budget_config import BucketSpec

MAX_REMEMBERED_REPLIES = 4096


@dataclass(frozen=True)
class BucketOp:
    want: float = 0.0  # grant up to this much more to the lease
    ret: float = 0.0  # unspent held tokens handed back
    spent: float = 0.0  # held tokens used since the last report
    refund: float = 0.0  # reported spent earlier, but the provider did not charge them after all
    debit: float = 0.0  # used beyond what was held (a reservation that under-estimated)


@dataclass(frozen=True)
class ProviderFeedback:
    remaining: float | None = None  # the provider's remaining count (headers), aged to the sender's now
    blocked_s: float | None = None  # a 429's Retry-After


@dataclass(frozen=True)
class SpendDelta:
    """Spend recorded for a tenant (exact totals: cost, tokens, attempts)."""

    usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    attempts: int = 0
    cancelled: int = 0
    wasted_tokens: int = 0  # charged by attempts that were cancelled

    def plus(self, other: SpendDelta) -> SpendDelta:
        return SpendDelta(
            self.usd + other.usd,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.attempts + other.attempts,
            self.cancelled + other.cancelled,
            self.wasted_tokens + other.wasted_tokens,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "usd": self.usd,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "attempts": self.attempts,
            "cancelled": self.cancelled,
            "wasted_tokens": self.wasted_tokens,
        }


@dataclass(frozen=True)
class ExchangeRequest:
    executor: str
    report_id: str  # unique per request; a retry reuses it
    lease_id: str | None = None
    ops: dict[str, BucketOp] = field(default_factory=dict)
    feedback: dict[str, ProviderFeedback] = field(default_factory=dict)
    spend: dict[str, SpendDelta] = field(default_factory=dict)  # tenant -> spend since the last report
    day: str = ""  # UTC day the spend belongs to
    ttl_s: float = 2.0
    close: bool = False  # return the lease: nothing more wanted
    exact: bool = False  # grant every `want` in full, or nothing
    balances: dict[str, float] = field(default_factory=dict)  # what the executor holds now, per bucket


@dataclass(frozen=True)
class BucketView:
    capacity: float
    rate_per_s: float
    level: float
    outstanding: float
    blocked_s: float = 0.0

    @property
    def free_fraction(self) -> float:
        return max(0.0, self.level) / self.capacity if self.capacity > 0 else 0.0

    def seconds_until(self, amount: float) -> float:
        """Lower bound: the earliest `amount` could be free, if nobody else took anything."""
        if amount > self.capacity + 1e-9:
            return math.inf
        short = amount - self.level
        if short <= 0:
            return self.blocked_s
        return max(self.blocked_s, short / self.rate_per_s) if self.rate_per_s > 0 else math.inf


@dataclass(frozen=True)
class ExchangeReply:
    lease_id: str
    lost: bool  # the lease had expired: balances held under it are void
    granted: dict[str, float]
    buckets: dict[str, BucketView]
    ttl_s: float
    targets: dict[str, float] = field(default_factory=dict)  # fair holding per bucket when contended
    degraded: bool = False  # the shared ledger is unreachable: conservative local limit


@dataclass
class Lease:
    lease_id: str
    executor: str
    expires_at: float
    held: dict[str, float] = field(default_factory=dict)


@dataclass
class SpendTotals:
    usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    attempts: int = 0
    cancelled: int = 0
    wasted_tokens: int = 0

    def add(self, d: SpendDelta) -> None:
        self.usd += d.usd
        self.input_tokens += d.input_tokens
        self.output_tokens += d.output_tokens
        self.attempts += d.attempts
        self.cancelled += d.cancelled
        self.wasted_tokens += d.wasted_tokens


Resolver = Callable[[str], BucketSpec | None]


class LeaseBook:
    """The in-memory ledger: buckets, live leases, tenants' recorded spend."""

    def __init__(self, resolve: Resolver, *, start_full: bool = True, scale: float = 1.0) -> None:
        self._resolve = resolve
        self._start_full = start_full
        self._scale = scale  # < 1: a conservative local limit (shared ledger down)
        self.buckets: dict[str, TokenBucket] = {}
        self.leases: dict[str, Lease] = {}
        self.spend: dict[tuple[str, str], SpendTotals] = {}
        self._replies: OrderedDict[str, ExchangeReply] = OrderedDict()

    def bucket(self, key: str, now: float) -> TokenBucket | None:
        bucket = self.buckets.get(key)
        spec = self._resolve(key)
        if spec is None:
            return bucket
        capacity, rate = spec.capacity * self._scale, spec.rate_per_s * self._scale
        if bucket is None:
            make = TokenBucket.full if self._start_full else TokenBucket.empty
            bucket = self.buckets[key] = make(capacity, rate, now)
        elif (bucket.capacity, bucket.rate_per_s) != (capacity, rate):
            bucket.resize(capacity, rate, now)
        return bucket

    def expire(self, now: float) -> list[Lease]:
        dead = [lease for lease in self.leases.values() if lease.expires_at <= now]
        for lease in dead:
            self._write_off(lease, now)
            del self.leases[lease.lease_id]
        return dead

    def _write_off(self, lease: Lease, now: float) -> None:
        for key, held in lease.held.items():
            if key in self.buckets:
                self.buckets[key].write_off(held, now)
        lease.held.clear()

    def exchange(self, req: ExchangeRequest, now: float, new_lease_id: str) -> ExchangeReply:
        seen = self._replies.get(req.report_id) if req.report_id else None
        if seen is not None:
            return seen
        self.expire(now)
        lease = self.leases.get(req.lease_id) if req.lease_id else None
        lost = req.lease_id is not None and lease is None
        if lease is None:
            lease = Lease(new_lease_id, req.executor, now + req.ttl_s)
        for key, fb in req.feedback.items():
            bucket = self.bucket(key, now)
            if bucket is not None:
                if fb.remaining is not None:
                    bucket.clamp(fb.remaining, now)
                if fb.blocked_s is not None:
                    bucket.block(fb.blocked_s, now)
        buckets: dict[str, TokenBucket] = {}
        for key in req.ops:
            bucket = self.bucket(key, now)
            if bucket is not None:
                buckets[key] = bucket
        for key, bucket in buckets.items():
            op = req.ops[key]
            if not lost:
                held = lease.held.get(key, 0.0)
                spent = min(op.spent, held)
                bucket.spend(spent, now)
                held -= spent
                back = bucket.give_back(min(op.ret, held), now)
                lease.held[key] = held - back
            bucket.refund(op.refund, now)
            bucket.debit(op.debit, now)
        granted = self._grant(req, lease, buckets, now)
        if req.close:
            self._write_off(lease, now)
            self.leases.pop(lease.lease_id, None)
        else:
            lease.expires_at = now + req.ttl_s
            self.leases[lease.lease_id] = lease
        for tenant, delta in req.spend.items():
            self.spend.setdefault((req.day, tenant), SpendTotals()).add(delta)
        reply = ExchangeReply(lease.lease_id, lost, granted, self.views(buckets, now), req.ttl_s)
        if req.report_id:
            self._replies[req.report_id] = reply
        while len(self._replies) > MAX_REMEMBERED_REPLIES:
            self._replies.popitem(last=False)
        return reply

    def _grant(
        self, req: ExchangeRequest, lease: Lease, buckets: dict[str, TokenBucket], now: float
    ) -> dict[str, float]:
        wants = {k: req.ops[k].want for k in buckets if req.ops[k].want > 0 and not req.close}
        if req.exact and any(buckets[k].available(now) + 1e-9 < w for k, w in wants.items()):
            return {}
        granted = {}
        for key, want in wants.items():
            got = buckets[key].take(want, now)
            if got > 0:
                granted[key] = got
                lease.held[key] = lease.held.get(key, 0.0) + got
        return granted

    @staticmethod
    def views(buckets: dict[str, TokenBucket], now: float) -> dict[str, BucketView]:
        out = {}
        for key, b in buckets.items():
            b.refill(now)
            out[key] = BucketView(b.capacity, b.rate_per_s, b.level, b.outstanding, max(0.0, b.blocked_until - now))
        return out

    def outstanding(self, key: str) -> float:
        return sum(lease.held.get(key, 0.0) for lease in self.leases.values())


class DemandBoard:
    """What each executor last asked for, per bucket; splits a scarce bucket by demand.

    When the wants of live executors exceed what a bucket has free, the bucket is contended. Each
    executor's share is its want over all live wants; it is granted at most what keeps its recent
    grants (exponentially decayed over the TTL) at that share of all recent grants plus what is free
    -- a deficit scheme, so the order in which executors ask does not matter. Its fair holding
    (`target`) is reported back so an executor holding more than its share returns the excess.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._wants: dict[str, tuple[float, dict[str, float], dict[str, float]]] = {}  # ex -> (seen, want, held)
        self._recent: dict[str, dict[str, float]] = {}  # ex -> bucket -> decayed grants
        self._decayed_at = -math.inf

    def report(self, executor: str, wants: dict[str, float], held: dict[str, float], now: float) -> None:
        self._wants[executor] = (now, dict(wants), dict(held))

    def granted(self, executor: str, granted: dict[str, float], now: float) -> None:
        self._decay(now)
        recent = self._recent.setdefault(executor, {})
        for key, amount in granted.items():
            recent[key] = recent.get(key, 0.0) + amount

    def forget(self, executor: str) -> None:
        self._wants.pop(executor, None)
        self._recent.pop(executor, None)

    def _decay(self, now: float) -> None:
        if now <= self._decayed_at:
            return
        factor = math.exp(-(now - self._decayed_at) / self.ttl_s) if self._decayed_at > -math.inf else 1.0
        self._decayed_at = now
        for recent in self._recent.values():
            for key in recent:
                recent[key] *= factor

    def live(self, now: float) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
        for ex in [ex for ex, (seen, _, _) in self._wants.items() if now - seen > self.ttl_s]:
            self.forget(ex)
        return {ex: (w, h) for ex, (_, w, h) in self._wants.items()}

    def cap(
        self, executor: str, wants: dict[str, float], free: dict[str, float], now: float
    ) -> tuple[dict[str, float], dict[str, float]]:
        """(capped wants, fair holding targets) for `executor`, given each bucket's free amount."""
        live = self.live(now)
        self._decay(now)
        mine = self._recent.get(executor, {})
        capped, targets = {}, {}
        for key, want in wants.items():
            total_want = sum(w.get(key, 0.0) for w, _ in live.values())
            avail = max(0.0, free.get(key, math.inf))
            if total_want <= avail or total_want <= 0:
                capped[key] = want
                continue
            share = want / total_want
            targets[key] = share * (avail + sum(h.get(key, 0.0) for _, h in live.values()))
            flow = avail + sum(self._recent.get(ex, {}).get(key, 0.0) for ex in live)
            capped[key] = min(want, avail, max(0.0, share * flow - mine.get(key, 0.0)))
        return capped, targets


def with_want(op: BucketOp, want: float) -> BucketOp:
    return replace(op, want=want)
