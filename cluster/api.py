"""`run_batch`: run a batch of records through a workflow on a Ray cluster; a loop over an `Engine`.

`ray.init()` starts a local cluster unless Ray is already initialised or `address` names one. With no
provider key or URL configured, the engine starts the built-in simulator and says so (see
`tailrace.cluster.providers`). Settings come as one typed `BatchConfig` (executor pool, hedging and
tuning, cluster budget, trace, runs in flight, user modules shipped to executors).

Results stream to `out` as runs finish. Running the same batch again (same workflow, inputs and
options) skips the runs already there; a different batch is refused until `fresh=True` (see
`tailrace.cluster.resume`). The batch stops at its first configuration error (a key the provider
rejects, an endpoint that refuses connections, a validator that is missing or raises) with a
`ConfigurationError` saying what to fix; the runs finished before it are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tailrace.cluster.budget import budget_status
from tailrace.cluster.config import BatchConfig, EngineConfig
from tailrace.cluster.connection import connect
from tailrace.cluster.engine import Engine, Providers, load_workflow_beside, shipped_module_names
from tailrace.cluster.pool import ExecutorPool, PoolConfig
from tailrace.cluster.providers import needs_simulator
from tailrace.cluster.results import BatchSummary, ResultWriter
from tailrace.cluster.resume import BatchIdentity, resume
from tailrace.cluster.trace import TraceConfig, TraceWriter, default_trace_path
from tailrace.engine.clock import Clock
from tailrace.engine.errors import ConfigurationError
from tailrace.engine.outcomes import FailureReason, RunOutcome
from tailrace.engine.providers.base import AdapterSettings
from tailrace.engine.records import Numbered, RejectedRecord, numbered_records
from tailrace.engine.spec_checks import check_schema_models, check_validators_registered
from tailrace.engine.specs import HedgeConfig, RunOptions, WorkflowSpec
from tailrace.policies.budget_config import BudgetConfig

log = logging.getLogger("tailrace")

Records = Iterable[Mapping[str, Any]] | str | Path
# run_batch's keyword arguments before BatchConfig, accepted for now and mapped onto it.
_LEGACY_CONFIG = ("pool", "trace", "hedge", "tuning", "budget", "grace_s", "stats_name", "max_in_flight")
_LEGACY_HOOKS = ("simulator", "executor_clock", "on_pool", "num_executors")


def start_executors(
    providers: Mapping[str, AdapterSettings],
    count: int,
    num_cpus: float = 0.5,
    *,
    hedge: HedgeConfig | None = None,
    tuning: Any = None,
    stats_name: str | None = None,
    budget: Any = None,
) -> list[Any]:
    """Start executors and wait until they answer, so actor start-up is not charged to the first runs
    (for drivers that manage executors themselves; `Engine` does this with a pool)."""
    import ray

    from tailrace.actors.step_executor import StepExecutor

    executors = [
        StepExecutor.options(max_concurrency=1000, num_cpus=num_cpus).remote(
            dict(providers), f"executor-{i}", hedge=hedge, tuning=tuning, stats_name=stats_name, budget=budget
        )
        for i in range(count)
    ]
    ray.get([e.health.remote() for e in executors])
    return executors


def _numbered(workflow: WorkflowSpec, records: Records, skip: set[str]) -> Numbered:
    # A record that cannot be a run comes as a `RejectedRecord`: it fails alone, typed, with its line.
    return numbered_records(workflow, records, skip)


def _trace_settings(options: RunOptions, config: BatchConfig) -> dict[str, Any]:
    """What a batch ran with, for the trace: `tailrace whatif` replays a trace under these (or changed) settings.
    Where the budget ledger lives (its Redis URL) is left out: it says nothing about the policy."""
    budget = config.budget
    return {
        "options": options.model_dump(mode="json"),
        "hedge": config.hedge.model_dump(mode="json"),
        "tuning": config.tuning.model_dump(mode="json"),
        "budget": None
        if budget is None
        else budget.model_dump(mode="json", exclude={"redis_url", "namespace", "actor_name"}),
        "executors": config.pool.min_executors,
        "max_executors": config.pool.max_executors,
        "max_in_flight": config.max_in_flight,
        "grace_s": config.grace_s,
    }


def run_batch(
    workflow: WorkflowSpec | str | Path,
    records: Records,
    *,
    options: RunOptions | None = None,
    out: str | Path | None = None,
    config: BatchConfig | None = None,
    providers: Providers | None = None,
    address: str | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
    fresh: bool = False,
    **legacy: Any,
) -> BatchSummary:
    """Run every record (a JSONL path or an iterable of dicts) through the workflow; outcomes stream to
    `out` (JSONL) as runs finish and `on_done` hears each. Returns the summary of this call's runs.

    `options` default to the workflow's `defaults`; `config` holds everything else (`BatchConfig`);
    `providers` are explicit endpoints or the simulator's (default: from the environment, else the
    built-in simulator); `address` names a Ray cluster; `fresh=True` replaces an earlier batch's results
    in `out` instead of resuming it. Raises `ConfigurationError` when the setup cannot work (user code
    an executor cannot resolve, a rejected key, a refused endpoint, ...), before or at the first run
    that shows it.
    """
    config, providers, hooks = _with_legacy(config, providers, legacy)
    if isinstance(workflow, WorkflowSpec):
        spec = workflow
    else:  # a file: modules beside it that the spec names travel with the executors
        spec, beside = load_workflow_beside(workflow)
        config = config.model_copy(update={"user_modules": tuple(dict.fromkeys([*config.user_modules, *beside]))})
    check_validators_registered(spec)  # before anything starts, in this process
    # Imports the modules schema models are named by, if the user allowed them (or ships them).
    check_schema_models(spec, allowed=shipped_module_names(config.user_modules))
    options = options or spec.defaults
    trace = config.trace
    if trace is None and out is not None:
        trace = TraceConfig(path=str(default_trace_path(out)))
    skip: set[str] = set()
    if out is not None:
        inputs_file = records if isinstance(records, str | Path) else None
        state = resume(out, BatchIdentity.of(spec, inputs_file, options), fresh=fresh, trace=trace and trace.path)
        skip = state.skip
        if state.note:
            log.warning("tailrace: %s", state.note)
    engine = Engine(config, workflows=[spec], providers=providers, address=address, **hooks.engine_kwargs())
    writer = ResultWriter(out)
    tracer = TraceWriter(trace, spec, settings=_trace_settings(options, config)) if trace else None
    summary = BatchSummary()
    inputs_of: dict[str, dict[str, Any]] = {}

    def remembered() -> Numbered:
        for run_id, record in _numbered(spec, records, skip):
            inputs_of[run_id] = {} if isinstance(record, RejectedRecord) else record  # while the run is in flight
            yield run_id, record

    def finished(outcome: RunOutcome) -> None:
        record = inputs_of.pop(outcome.run_id, None)
        writer.write(outcome)
        summary.add(outcome)
        if tracer is not None:
            tracer.write(outcome, record)
        if on_done is not None:
            on_done(outcome)

    async def drive() -> None:
        async with engine:
            if hooks.on_pool is not None and engine.pool is not None:
                hooks.on_pool(engine.pool)
            await run_all(engine, spec, options, remembered(), config.max_in_flight, finished)

    try:
        asyncio.run(drive())
    except ConfigurationError as exc:
        kept = f"; the {summary.runs} runs finished before it are in {out}" if out and summary.runs else ""
        raise ConfigurationError(f"{exc}{kept}") from None
    finally:
        writer.close()
        if tracer is not None:
            tracer.close()
    return summary


async def run_all(
    engine: Engine,
    workflow: WorkflowSpec,
    options: RunOptions,
    records: Iterable[tuple[str, dict[str, Any] | RejectedRecord]],
    max_in_flight: int,
    finished: Callable[[RunOutcome], None],
) -> None:
    """Run records through the engine, at most `max_in_flight` at once, each outcome to `finished` as it
    ends. At the first run that ended in a configuration error the rest are cancelled and not recorded
    (so running again after the fix runs them), and `ConfigurationError` says what to fix."""
    in_flight: set[asyncio.Task[RunOutcome]] = set()

    def absorb(done: set[asyncio.Task[RunOutcome]]) -> None:
        for task in done:
            outcome = task.result()
            if outcome.failure == FailureReason.CONFIGURATION_ERROR:
                raise ConfigurationError(
                    f"the batch stopped at its first configuration error (run {outcome.run_id}): {outcome.detail}"
                )
            finished(outcome)

    try:
        for run_id, record in records:
            while len(in_flight) >= max_in_flight:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                absorb(done)
            in_flight.add(asyncio.ensure_future(engine.run(workflow, record, options=options, run_id=run_id)))
        while in_flight:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            absorb(done)
    finally:
        for task in in_flight:
            task.cancel()
        for task in in_flight:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _Hooks:
    """Test and drill hooks that are not configuration: the executors' clock, a look at the pool."""

    def __init__(self, executor_clock: Clock | None = None, on_pool: Callable[[ExecutorPool], None] | None = None):
        self.executor_clock = executor_clock
        self.on_pool = on_pool

    def engine_kwargs(self) -> dict[str, Any]:
        return {"executor_clock": self.executor_clock}


def _with_legacy(
    config: BatchConfig | None, providers: Providers | None, legacy: Mapping[str, Any]
) -> tuple[BatchConfig, Providers | None, _Hooks]:
    """Map the keyword arguments run_batch took before `BatchConfig` onto it (deprecated)."""
    unknown = sorted(set(legacy) - set(_LEGACY_CONFIG) - set(_LEGACY_HOOKS))
    if unknown:
        raise TypeError(f"run_batch() got unexpected keyword argument(s): {', '.join(unknown)}")
    config = config or BatchConfig()
    fields = {k: legacy[k] for k in _LEGACY_CONFIG if legacy.get(k) is not None}
    if "trace" in legacy and legacy["trace"] is False:
        fields["trace"] = False
    if legacy.get("num_executors") is not None and "pool" not in fields:
        fields["pool"] = PoolConfig.fixed(legacy["num_executors"])
    if fields:
        warnings.warn(
            f"run_batch({', '.join(sorted(fields))}=...) is deprecated: pass config=BatchConfig(...)",
            DeprecationWarning,
            stacklevel=3,
        )
        config = config.model_copy(update=fields)
    if legacy.get("simulator") is not None:
        providers = providers or legacy["simulator"]
    return config, providers, _Hooks(legacy.get("executor_clock"), legacy.get("on_pool"))


__all__ = [
    "BatchConfig",
    "BudgetConfig",
    "Engine",
    "EngineConfig",
    "ExecutorPool",
    "PoolConfig",
    "TraceConfig",
    "budget_status",
    "connect",
    "needs_simulator",
    "run_all",
    "run_batch",
    "start_executors",
]
