"""The step graph of a workflow: order, readiness, cycles and the (remaining) critical path.

Edges point from a step to the steps that depend on it (parent -> child). Every order this module
returns is deterministic: ties are broken by declaration order, so two runs of one spec schedule
and report identically.

Weights are expected step durations in seconds. `remaining_critical_path(step)` is the longest
weighted path that starts at `step` (inclusive); the time allocator gives a step
`remaining_time * w(step) / remaining_critical_path(step)`, so a step on a long chain does not
spend the time its successors will need.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from tailrace.engine.errors import SpecError

if TYPE_CHECKING:
    from tailrace.engine.specs import WorkflowSpec


def find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle in the graph `node -> targets`, as `[a, b, c, a]`, or None when there is none.

    Pass parent -> children edges to get the cycle in the order data would flow.

    Targets that are not keys of `edges` are ignored (unknown names are reported elsewhere). The
    search runs in key order and the cycle starts at its earliest node, so the answer is stable.
    """
    order = {node: i for i, node in enumerate(edges)}
    state: dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: finished
    for root in edges:
        if root in state:
            continue
        # Iterative DFS: the path and, per node on it, an iterator over its remaining targets.
        path = [root]
        todo = [iter(edges[root])]
        state[root] = 1
        while path:
            nxt = next((t for t in todo[-1] if t in order), None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                cycle = path[path.index(nxt) :]
                first = min(range(len(cycle)), key=lambda i: order[cycle[i]])
                cycle = cycle[first:] + cycle[:first]
                return [*cycle, cycle[0]]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(edges[nxt]))
    return None


def ancestors_of(parents: Mapping[str, Sequence[str]], node: str) -> set[str]:
    """Every node `node` depends on, directly or through others (safe on graphs with cycles)."""
    seen: set[str] = set()
    todo = list(parents.get(node, ()))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(parents.get(n, ()))
    return seen


class Dag:
    """An acyclic graph of step ids, in declaration order."""

    def __init__(self, nodes: Sequence[str], parents: Mapping[str, Sequence[str]]) -> None:
        """`parents[n]` are the nodes `n` depends on; nodes missing from `parents` have none."""
        self._nodes = tuple(nodes)
        self._index = {n: i for i, n in enumerate(self._nodes)}
        if len(self._index) != len(self._nodes):
            raise SpecError("steps", "duplicate step ids")
        self._parents: dict[str, tuple[str, ...]] = {}
        for n in self._nodes:
            ps = tuple(parents.get(n, ()))
            unknown = [p for p in ps if p not in self._index]
            if unknown:
                raise SpecError(f"steps[{n}].depends_on", f"unknown steps: {', '.join(unknown)}")
            self._parents[n] = ps
        self._children: dict[str, list[str]] = {n: [] for n in self._nodes}
        for n in self._nodes:  # declaration order, so children lists are in declaration order
            for p in dict.fromkeys(self._parents[n]):
                self._children[p].append(n)
        cycle = find_cycle(self._children)
        if cycle is not None:
            raise SpecError(f"steps[{cycle[0]}].depends_on", "cycle: " + " -> ".join(cycle))
        self._topo = self._kahn()

    @classmethod
    def from_spec(cls, spec: WorkflowSpec) -> Dag:
        return cls([s.id for s in spec.steps], {s.id: s.depends_on for s in spec.steps})

    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: object) -> bool:
        return node in self._index

    def parents(self, node: str) -> list[str]:
        """The nodes `node` depends on, in its `depends_on` order."""
        return list(dict.fromkeys(self._parents[node]))

    def children(self, node: str) -> list[str]:
        """The nodes that depend on `node`, in declaration order."""
        return list(self._children[node])

    def ancestors(self, node: str) -> list[str]:
        """Every node `node` depends on, directly or not, in declaration order.

        These are the outputs a step's templates may use: all of them are done before it starts.
        """
        if node not in self._index:
            raise KeyError(node)
        found = ancestors_of(self._parents, node)
        return [n for n in self._nodes if n in found]

    def roots(self) -> list[str]:
        return [n for n in self._nodes if not self._parents[n]]

    def sinks(self) -> list[str]:
        return [n for n in self._nodes if not self._children[n]]

    def topological_order(self) -> list[str]:
        return list(self._topo)

    def ready(self, done: Iterable[str], started: Iterable[str]) -> list[str]:
        """Nodes not yet started or done whose parents are all done, in declaration order."""
        done_set, started_set = set(done), set(started)
        return [
            n
            for n in self._nodes
            if n not in done_set and n not in started_set and all(p in done_set for p in self._parents[n])
        ]

    def critical_path(self, weights: Mapping[str, float]) -> tuple[list[str], float]:
        """The longest weighted path through the graph and its total weight.

        Ties go to the path that is earlier in declaration order.
        """
        w = self._weights(weights)
        best: dict[str, float] = {}  # longest path ending at n, inclusive
        via: dict[str, str | None] = {}
        for n in self._topo:
            prev = None
            for p in sorted(self._parents[n], key=self._index.__getitem__):
                if prev is None or best[p] > best[prev]:
                    prev = p
            best[n] = w[n] + (best[prev] if prev is not None else 0.0)
            via[n] = prev
        if not best:
            return [], 0.0
        end = max(self._nodes, key=lambda n: (best[n], -self._index[n]))
        path = [end]
        while (p := via[path[-1]]) is not None:
            path.append(p)
        return path[::-1], best[end]

    def remaining_critical_paths(self, weights: Mapping[str, float]) -> dict[str, float]:
        """For every node, the longest weighted path that starts there (inclusive)."""
        w = self._weights(weights)
        rest: dict[str, float] = {}
        for n in reversed(self._topo):
            rest[n] = w[n] + max((rest[c] for c in self._children[n]), default=0.0)
        return rest

    def remaining_critical_path(self, from_step: str, weights: Mapping[str, float]) -> float:
        """The longest weighted path that starts at `from_step`, inclusive."""
        if from_step not in self._index:
            raise KeyError(from_step)
        return self.remaining_critical_paths(weights)[from_step]

    def _weights(self, weights: Mapping[str, float]) -> dict[str, float]:
        missing = [n for n in self._nodes if n not in weights]
        if missing:
            raise KeyError(f"no weight for steps: {', '.join(missing)}")
        negative = [n for n in self._nodes if weights[n] < 0]
        if negative:
            raise ValueError(f"negative weight for steps: {', '.join(negative)}")
        return {n: float(weights[n]) for n in self._nodes}

    def _kahn(self) -> list[str]:
        # A heap keyed by declaration index: among the nodes that are ready, the earliest goes first.
        pending = {n: len(set(self._parents[n])) for n in self._nodes}
        heap = [self._index[n] for n in self._nodes if pending[n] == 0]
        heapq.heapify(heap)
        order: list[str] = []
        while heap:
            n = self._nodes[heapq.heappop(heap)]
            order.append(n)
            for c in self._children[n]:
                pending[c] -= 1
                if pending[c] == 0:
                    heapq.heappush(heap, self._index[c])
        return order
