"""Metrics through `ray.util.metrics`, created lazily and once per process, with Prometheus naming.

Series reach the Ray dashboard's Prometheus endpoint with a `ray_` prefix (exported by each node's
metrics agent every ~10 s). Labels stay low-cardinality: model, provider, step, outcome, reason;
never run ids. Exact totals (cost, tokens) are counters: histogram sums are approximate.
Outside a Ray worker or driver (plain unit tests) every call is a no-op.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

_lock = threading.Lock()
_metrics: dict[str, Any] = {}

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]


def _ray_ready() -> bool:
    # Never import ray here: a process that has not imported it (a unit test) has no metrics to export.
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _get(kind: str, name: str, description: str, tag_keys: Sequence[str], **kwargs: Any) -> Any:
    metric = _metrics.get(name)
    if metric is not None:
        return metric
    if not _ray_ready():
        return None
    from ray.util import metrics

    with _lock:
        metric = _metrics.get(name)
        if metric is None:
            cls = {"counter": metrics.Counter, "histogram": metrics.Histogram, "gauge": metrics.Gauge}[kind]
            metric = cls(name, description=description, tag_keys=tuple(tag_keys), **kwargs)
            _metrics[name] = metric
    return metric


def count(name: str, description: str, tags: dict[str, str], value: float = 1.0) -> None:
    """Increment counter `name` (must end in `_total`)."""
    metric = _get("counter", name, description, sorted(tags))
    if metric is not None and value:
        metric.inc(value, tags=tags)


def observe(
    name: str, description: str, tags: dict[str, str], value: float, boundaries: Sequence[float] = LATENCY_BUCKETS_S
) -> None:
    metric = _get("histogram", name, description, sorted(tags), boundaries=list(boundaries))
    if metric is not None:
        metric.observe(value, tags=tags)


def gauge(name: str, description: str, tags: dict[str, str], value: float) -> None:
    metric = _get("gauge", name, description, sorted(tags))
    if metric is not None:
        metric.set(value, tags=tags)
