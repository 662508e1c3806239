"""Everything that touches a running cluster: `run_batch` and the driver that enforces each run's
deadline, the executor pool, batches as Ray jobs, traces, the tail report, replay, the what-if and the CLI.

Names resolve lazily (importing this package does not import Ray, so the CLI checks input first)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_batch": "tailrace.cluster.api",
    "connect": "tailrace.cluster.connection",
    "start_executors": "tailrace.cluster.api",
    "Engine": "tailrace.cluster.engine",
    "EngineConfig": "tailrace.cluster.config",
    "BatchConfig": "tailrace.cluster.config",
    "WorkflowDriver": "tailrace.cluster.driver",
    "ExecutorPool": "tailrace.cluster.pool",
    "PoolConfig": "tailrace.cluster.pool",
    "TraceConfig": "tailrace.cluster.trace",
    "BatchSummary": "tailrace.cluster.results",
    "budget_status": "tailrace.cluster.budget",
    "what_if": "tailrace.cluster.whatif",
    "tune": "tailrace.cluster.whatif",
}

__all__ = [
    "BatchConfig",
    "BatchSummary",
    "Engine",
    "EngineConfig",
    "ExecutorPool",
    "PoolConfig",
    "TraceConfig",
    "WorkflowDriver",
    "budget_status",
    "connect",
    "run_batch",
    "start_executors",
    "tune",
    "what_if",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tailrace.cluster' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
