"""`run_batch`: the Python API to run a batch of records through a workflow on a Ray cluster.

`ray.init()` starts a local cluster unless Ray is already initialised or `address` names one. With no
provider configured, the embedded simulator serves the calls (see `tailrace.cluster.providers`).

Steps are hedged by default (`hedge=HedgeConfig(...)` tunes it, `HedgeConfig(enabled=False)` runs the
sequential retry policy). Executors share latency windows through a stats actor: one per batch unless
`stats_name` names a longer-lived one to share (and start warm from) across batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import ray

from tailrace.actors.budget_actor import BudgetHandle
from tailrace.actors.latency_stats import stats_actor
from tailrace.actors.step_executor import StepExecutor
from tailrace.cluster.budget import BudgetAdmission, budget_status, ensure_budget
from tailrace.cluster.driver import WorkflowDriver, run_records
from tailrace.cluster.pool import ExecutorPool, PoolConfig
from tailrace.cluster.providers import SimulatorEndpoints, needs_simulator, resolve_providers
from tailrace.cluster.results import BatchSummary, ResultWriter, finished_run_ids
from tailrace.cluster.trace import TraceConfig, TraceWriter, default_trace_path
from tailrace.engine.clock import DEFAULT_GRACE_S, SYSTEM_CLOCK, Clock, Deadline, wait_for
from tailrace.engine.loading import check_inputs, load_inputs, load_workflow
from tailrace.engine.outcomes import RunOutcome
from tailrace.engine.providers.base import AdapterSettings
from tailrace.engine.spec_checks import check_validators_registered
from tailrace.engine.specs import HedgeConfig, RunOptions, WorkflowSpec
from tailrace.policies.budget_config import BudgetConfig
from tailrace.policies.hedging import TailTuning

log = logging.getLogger("tailrace")

Records = Iterable[Mapping[str, Any]] | str | Path


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start or join a Ray cluster, once per process."""
    if ray.is_initialized():
        return
    ray.init(address=address, num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=False)


def start_executors(
    providers: Mapping[str, AdapterSettings],
    count: int,
    num_cpus: float = 0.5,
    *,
    hedge: HedgeConfig | None = None,
    tuning: TailTuning | None = None,
    stats_name: str | None = None,
    budget: BudgetHandle | None = None,
) -> list[Any]:
    """Start executors and wait until they answer, so actor start-up is not charged to the first runs."""
    executors = [
        StepExecutor.options(max_concurrency=1000, num_cpus=num_cpus).remote(
            dict(providers), f"executor-{i}", hedge=hedge, tuning=tuning, stats_name=stats_name, budget=budget
        )
        for i in range(count)
    ]
    ray.get([e.health.remote() for e in executors])
    return executors


async def _on_every_executor(pool: ExecutorPool, method: str, within_s: float = 10.0) -> None:
    calls = asyncio.gather(*(getattr(h, method).remote() for h in pool.handles()), return_exceptions=True)
    try:
        for error in await wait_for(calls, Deadline.after(within_s, SYSTEM_CLOCK)):
            if isinstance(error, BaseException):
                log.warning("an executor failed %s: %s", method, type(error).__name__)
    except TimeoutError:
        log.warning("executors did not finish %s within %.0f s", method, within_s)


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


def _trace_settings(
    options: RunOptions,
    hedge: HedgeConfig,
    tuning: TailTuning,
    budget: BudgetConfig | None,
    pool: PoolConfig,
    max_in_flight: int,
    grace_s: float,
) -> dict[str, Any]:
    """What a batch ran with, for the trace: `tailrace whatif` replays a trace under these (or changed) settings.
    Where the budget ledger lives (its Redis URL) is left out: it says nothing about the policy."""
    return {
        "options": options.model_dump(mode="json"),
        "hedge": hedge.model_dump(mode="json"),
        "tuning": tuning.model_dump(mode="json"),
        "budget": None
        if budget is None
        else budget.model_dump(mode="json", exclude={"redis_url", "namespace", "actor_name"}),
        "executors": pool.min_executors,
        "max_executors": pool.max_executors,
        "max_in_flight": max_in_flight,
        "grace_s": grace_s,
    }


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
    pool: PoolConfig | None = None,
    trace: TraceConfig | Literal[False] | None = None,
    executor_clock: Clock | None = None,
    on_pool: Callable[[ExecutorPool], None] | None = None,
    hedge: HedgeConfig | None = None,
    tuning: TailTuning | None = None,
    stats_name: str | None = None,
    budget: BudgetConfig | None = None,
) -> BatchSummary:
    """Run every record through the workflow; outcomes stream to `out` (JSONL) as runs finish.

    Runs already present in `out` are skipped, so an interrupted batch resumes where it stopped.
    Executors come from an `ExecutorPool` (`pool`; default: `num_executors` of them, fixed, dead ones
    replaced). Every attempt is traced to `trace` (default: `<out>.trace.jsonl` next to `out`; False:
    no trace). `executor_clock` is the clock executors run on (tests inject a skewed one).
    `hedge` is the executors' default tail control (steps override fields with their own `hedge`);
    `tuning` sets the latency windows, circuit breakers and retry throttle they share.
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
    if trace is None and out is not None:
        trace = TraceConfig(path=str(default_trace_path(out)))
    connect(address)
    hedge = hedge or HedgeConfig()
    tuning = tuning or TailTuning()
    batch_stats = stats_name is None
    stats_name = stats_name or f"tailrace-latency-stats-{uuid.uuid4().hex[:12]}"
    stats = stats_actor(stats_name, tuning.latency)  # owned by this driver, not by one executor
    handle = ensure_budget(budget, spec) if budget is not None else None
    admission = (
        BudgetAdmission(handle.config, spec, handle.actor) if handle is not None and handle.config.admission else None
    )
    writer = ResultWriter(out)
    pool = pool or PoolConfig.fixed(num_executors)
    settings = _trace_settings(options, hedge, tuning, budget, pool, max_in_flight, grace_s)
    tracer = TraceWriter(trace, spec, settings=settings) if trace else None
    summary = BatchSummary()
    inputs_of: dict[str, dict[str, Any]] = {}

    def remembered() -> Iterator[tuple[str, dict[str, Any]]]:
        for run_id, record in _numbered(spec, records, skip):
            inputs_of[run_id] = record  # only while the run is in flight
            yield run_id, record

    def finished(outcome: RunOutcome) -> None:
        record = inputs_of.pop(outcome.run_id, None)
        if tracer is not None:
            tracer.write(outcome, record)
        if on_done is not None:
            on_done(outcome)

    async def drive() -> None:
        async with ExecutorPool(
            providers,
            pool,
            executor_clock=executor_clock,
            executor_kwargs={"hedge": hedge, "tuning": tuning, "stats_name": stats_name, "budget": handle},
        ) as executors:
            if on_pool is not None:
                on_pool(executors)
            driver = WorkflowDriver(spec, options, executors, grace_s=grace_s, hedge=hedge, admission=admission)
            await run_records(driver, remembered(), writer, summary, max_in_flight, finished)
            if handle is not None:  # executors return their leases and report their last spend
                await _on_every_executor(executors, "shutdown")
            if not batch_stats:  # a shared stats actor outlives the batch: hand it the last samples
                await _on_every_executor(executors, "sync_stats")

    try:
        asyncio.run(drive())
    finally:
        writer.close()
        if tracer is not None:
            tracer.close()
        if batch_stats:
            with contextlib.suppress(Exception):
                ray.kill(stats)
    return summary


__all__ = [
    "BudgetConfig",
    "ExecutorPool",
    "PoolConfig",
    "TraceConfig",
    "budget_status",
    "connect",
    "needs_simulator",
    "run_batch",
    "start_executors",
]
