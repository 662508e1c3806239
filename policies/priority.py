"""Who gets budget first when there is not enough for everyone.

* Primary attempts (and retries, which a run needs to finish) wait in a `FairQueue`. Steps of runs
  already under way come first (`CONTINUING`): a run that dies at its fifth step wasted four, so a
  new run's first step waits behind them. Within that, weighted fair share between tenants
  (start-time fair queueing: a tenant with weight 2 is served twice the tokens of a tenant with
  weight 1 while both wait), earliest deadline first within a tenant.
* Duplicates (speculative attempts) never wait: they are granted only from spare capacity, when no
  primary is waiting and the bucket is comfortably below its ceiling (`speculative_allowed`), so
  near the ceiling they stop first.

Pure data structures; the executor's lease pool and the tests drive them.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PRIMARY = "primary"
SPECULATIVE = "speculative"
CONTINUING, STARTING = 0, 1  # waiter ranks: steps of runs under way, then runs' first steps


def priority_class(role: str) -> str:
    """`duplicate` attempts are speculative; primaries and retries are what a run needs."""
    return SPECULATIVE if role == "duplicate" else PRIMARY


def rank(role: str, continuing: bool) -> int:
    """A retry, or any attempt of a run that already has steps done, continues a run: it goes first."""
    return CONTINUING if continuing or role == "retry" else STARTING


@dataclass(eq=False)
class Waiter:
    tenant: str
    deadline: float  # monotonic; EDF key
    need: Mapping[str, float]  # bucket -> amount
    size: float  # what it counts for the tenant's fair share (tokens)
    payload: Any = None
    rank: int = CONTINUING  # lower first, before fair share and deadlines
    removed: bool = field(default=False, repr=False)


class FairQueue:
    """Waiting primaries: by rank, then weighted fair share across tenants, EDF within a tenant. Cancelled
    waiters are removed lazily (O(1)), as aiolimiter prunes its heap."""

    def __init__(self, weight: Callable[[str], float]) -> None:
        self._weight = weight
        self._heaps: dict[str, list[tuple[int, float, int, Waiter]]] = {}
        self._vtime: dict[str, float] = {}  # each tenant's virtual time (start tag of its next request)
        self._virtual_now = 0.0  # start tag of the last request served
        self._seq = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, waiter: Waiter) -> None:
        heap = self._heaps.setdefault(waiter.tenant, [])
        self._prune(waiter.tenant)
        if not heap:  # newly backlogged: no credit for the time it was idle
            self._vtime[waiter.tenant] = max(self._vtime.get(waiter.tenant, 0.0), self._virtual_now)
        heapq.heappush(heap, (waiter.rank, waiter.deadline, next(self._seq), waiter))
        self._len += 1

    def remove(self, waiter: Waiter) -> None:
        if not waiter.removed:
            waiter.removed = True
            self._len -= 1

    def _prune(self, tenant: str) -> None:
        heap = self._heaps.get(tenant)
        while heap and heap[0][3].removed:
            heapq.heappop(heap)

    def head(self) -> Waiter | None:
        """The waiter to serve next (not removed from the queue)."""
        best: tuple[int, float, float, str] | None = None
        for tenant in list(self._heaps):
            self._prune(tenant)
            heap = self._heaps[tenant]
            if not heap:
                del self._heaps[tenant]
                continue
            key = (heap[0][0], self._vtime[tenant], heap[0][1], tenant)
            if best is None or key < best:
                best = key
        return None if best is None else self._heaps[best[3]][0][3]

    def pop(self) -> Waiter | None:
        waiter = self.head()
        if waiter is None:
            return None
        heapq.heappop(self._heaps[waiter.tenant])
        self._len -= 1
        start = self._vtime[waiter.tenant]
        self._virtual_now = max(self._virtual_now, start)
        self._vtime[waiter.tenant] = start + waiter.size / self._weight(waiter.tenant)
        waiter.removed = True
        return waiter

    def needs_ahead(self, deadline: float, rank: int = CONTINUING) -> dict[str, float]:
        """What waiters ahead of one of `rank` due at `deadline` need in total (a lower bound on what is
        ahead): every waiter of a lower rank, and those of its rank due no later."""
        total: dict[str, float] = {}
        for heap in self._heaps.values():
            for r, due, _, w in heap:
                if not w.removed and (r < rank or (r == rank and due <= deadline)):
                    for key, amount in w.need.items():
                        total[key] = total.get(key, 0.0) + amount
        return total

    def total_needs(self) -> dict[str, float]:
        return self.needs_ahead(float("inf"), rank=STARTING + 1)


def speculative_allowed(
    need: Mapping[str, float],
    balances: Mapping[str, float],
    free_fraction: Mapping[str, float],
    spare_fraction: float,
    primaries_waiting: bool,
) -> bool:
    """A duplicate may spend only spare capacity: nobody needy is waiting, it fits what this executor
    holds, and every bucket it touches is at least `spare_fraction` free globally."""
    if primaries_waiting:
        return False
    for key, amount in need.items():
        if balances.get(key, 0.0) + 1e-9 < amount:
            return False
        if free_fraction.get(key, 0.0) < spare_fraction:
            return False
    return True
