"""`run_batch`: the Python API to run a batch of records through a workflow on a Ray cluster.

`ray.init()` starts a local cluster unless Ray is already initialised or `address` names one. With no
provider configured, the embedded simulator serves the calls (see `cluster.providers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ray

from actors.budget_actor import BudgetHandle
from actors.step_executor import StepExecutor
from cluster.budget import BudgetAdmission, budget_status, ensure_budget
from cluster.driver import DEFAULT_GRACE_S, WorkflowDriver, run_records
from cluster.providers import SimulatorEndpoints, needs_simulator, resolve_providers
from cluster.results import BatchSummary, ResultWriter, finished_run_ids
from engine.loading import check_inputs, load_inputs, load_workflow
from engine.outcomes import RunOutcome
from engine.providers.base import AdapterSettings
from engine.spec_checks import check_validators_registered
from engine.specs import RunOptions, WorkflowSpec
from policies.budget_config import BudgetConfig

log = logging.getLogger("tailrace")

Records = Iterable[Mapping[str, Any]] | str | Path


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start or join a Ray cluster, once per process."""
    if ray.is_initialized():
        return
    ray.init(address=address, num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=False)


def start_executors(providers: Mapping[str, AdapterSettings], count: int, num_cpus: float = 0.5,
                    budget: BudgetHandle | None = None) -> list[Any]:
    """Start executors and wait until they answer, so actor start-up is not charged to the first runs."""
    executors = [
        StepExecutor.options(max_concurrency=1000, num_cpus=num_cpus).remote(dict(providers), f"executor-{i}",
                                                                            budget)
        for i in range(count)
    ]
    ray.get([e.health.remote() for e in executors])
    return executors


def _numbered(workflow: WorkflowSpec, records: Records, skip: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(records, str | Path):
        numbered: Iterable[tuple[int, Mapping[str, Any]]] = load_inputs(records)
    else:
        numbered = enumerate(records, start=1)
    for line, record in numbered:
        run_id = str(record.get("run_id") or record.get("id") or f"run-{line:06d}")
        if run_id in skip:
            continue
        check_inputs(workflow, dict(record), line)
        yield run_id, dict(record)


def run_batch(
    workflow: WorkflowSpec | str | Path,
    records: Records,
    *,
    options: RunOptions | None = None,
    out: str | Path | None = None,
    address: str | None = None,
    providers: Mapping[str, AdapterSettings] | None = None,
    simulator: SimulatorEndpoints | None = None,
    num_executors: int = 2,
    max_in_flight: int = 64,
    grace_s: float = DEFAULT_GRACE_S,
    on_done: Callable[[RunOutcome], None] | None = None,
    budget: BudgetConfig | None = None,
) -> BatchSummary:
    """Run every record through the workflow; outcomes stream to `out` (JSONL) as runs finish.

    Runs already present in `out` are skipped, so an interrupted batch resumes where it stopped.
    With `budget`, every attempt is counted against the cluster's budget actor (TPM, RPM, tenants'
    daily spend; found or created by name) and runs that cannot be served before their deadline
    are refused at submission (`budget_exhausted`).
    """
    spec = workflow if isinstance(workflow, WorkflowSpec) else load_workflow(workflow)
    check_validators_registered(spec)
    options = options or spec.defaults
    if providers is None:
        providers = resolve_providers(spec, simulator)
    skip = finished_run_ids(out) if out else set()
    connect(address)
    handle = ensure_budget(budget, spec) if budget is not None else None
    admission = BudgetAdmission(handle.config, spec, handle.actor) \
        if handle is not None and handle.config.admission else None
    executors = start_executors(providers, num_executors, budget=handle)
    writer = ResultWriter(out)
    summary = BatchSummary()
    try:
        driver = WorkflowDriver(spec, options, executors, grace_s=grace_s, admission=admission)
        asyncio.run(run_records(driver, _numbered(spec, records, skip), writer, summary, max_in_flight, on_done))
    finally:
        writer.close()
        if handle is not None:   # executors return their leases and report their last spend
            with contextlib.suppress(Exception):
                ray.get([e.shutdown.remote() for e in executors], timeout=10)
        for executor in executors:
            with contextlib.suppress(Exception):
                ray.kill(executor)
    return summary


__all__ = ["BudgetConfig", "budget_status", "connect", "needs_simulator", "run_batch", "start_executors"]
