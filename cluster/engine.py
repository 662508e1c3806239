"""The online engine: start once, then run one workflow run per request, many at once.

    async with Engine(EngineConfig(...), workflows=[workflow]) as engine:
        outcome = await engine.run(workflow, {"ticket_id": "T-1", ...}, deadline=8.0)

Started once: Ray (joined, or a local cluster), the built-in provider simulator when no provider key
or URL is configured (and says so), the executor pool, the shared latency statistics and the cluster
budget. A run costs what its steps cost plus a few milliseconds (`benchmarks/overhead.py`): it goes
through a `WorkflowDriver` kept per workflow and options, and its steps are spread over the
executors (least busy first, ties in turn).

Before the first run of a workflow, `prepare` ships the user code it names to every executor and has
each one resolve it (validators, schema models) and check its providers; whatever an executor cannot
use stops here with a `ConfigurationError` naming the field, the name, the executor and its node.
A run whose step failed on nothing but configuration faults ends `configuration_error`; `run_batch`
(a loop over an engine) stops the batch at the first one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tailrace.cluster.config import EngineConfig
from tailrace.cluster.connection import connect
from tailrace.cluster.driver import WorkflowDriver
from tailrace.cluster.pool import ExecutorPool
from tailrace.cluster.providers import SimulatorEndpoints, needs_simulator, resolve_providers, serving_spec
from tailrace.cluster.trace import workflow_json
from tailrace.engine.clock import SYSTEM_CLOCK, Clock, Deadline, RunDeadline, wait_for
from tailrace.engine.errors import ConfigurationError, InputError
from tailrace.engine.loading import load_workflow
from tailrace.engine.outcomes import RunOutcome
from tailrace.engine.providers.base import AdapterSettings
from tailrace.engine.records import RejectedRecord
from tailrace.engine.spec_checks import check_schema_models, check_validators_registered
from tailrace.engine.specs import RunOptions, WorkflowSpec
from tailrace.engine.user_code import code_refs

log = logging.getLogger("tailrace")

Providers = Mapping[str, AdapterSettings] | SimulatorEndpoints


class Engine:
    """A long-lived engine (see the module docstring). Use `async with Engine(...) as engine:`, or
    `await engine.start()` and `await engine.close()`, inside one event loop."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        workflows: Iterable[WorkflowSpec | str | Path] = (),
        providers: Providers | None = None,
        address: str | None = None,
        executor_clock: Clock | None = None,
    ) -> None:
        """`workflows`: what this engine will serve (their providers and limits are set up at start, and
        they are prepared before `start` returns); `engine.run` accepts others whose providers it has.
        A workflow given as a file may name user code in modules beside it (`"checks:Triage"`): they are
        importable here and shipped with the executors. `providers`: explicit endpoints, or the
        simulator's (default: from the environment, and the built-in simulator when nothing is
        configured). `address`: the Ray cluster to join (default: the one Ray is connected to,
        `RAY_ADDRESS`, else a new local cluster). `executor_clock`: the clock executors run on (tests and
        clock-skew drills)."""
        self.config = config or EngineConfig()
        self._workflows: list[WorkflowSpec] = []
        for workflow in workflows:
            if not isinstance(workflow, WorkflowSpec):  # a file: modules beside it travel with the executors
                workflow, beside = load_workflow_beside(workflow)
                shipped = list(dict.fromkeys([*self.config.user_modules, *beside]))
                self.config = self.config.model_copy(update={"user_modules": tuple(shipped)})
            self._workflows.append(workflow)
        self._address = address
        self._executor_clock = executor_clock
        self._serving = serving_spec(self._workflows)
        # Resolved now, before Ray starts: a half-configured provider is an error at once.
        self._simulate = providers is None and needs_simulator(self._serving)
        self._providers: dict[str, AdapterSettings] = {}
        if isinstance(providers, SimulatorEndpoints):
            self._providers = resolve_providers(self._serving, providers)
        elif providers is not None:
            self._providers = dict(providers)
        elif not self._simulate:
            self._providers = resolve_providers(self._serving)
        self._shipped: dict[str, bytes] = {}  # user code for executors; the pool sends it to each new one
        self._prepared: dict[Any, WorkflowSpec] = {}
        self._preparing: dict[Any, asyncio.Future[WorkflowSpec]] = {}
        self._drivers: dict[tuple[int, RunOptions], WorkflowDriver] = {}
        self._admissions: dict[int, Any] = {}
        self._keep: list[WorkflowSpec] = []  # specs whose id() keys the caches stay alive
        self._stack = contextlib.ExitStack()
        self._budget: Any = None
        self._stats: Any = None
        self._journal: Any = None  # where a dead executor's attempts are found (`tailrace.actors.attempt_journal`)
        self._journal_name = f"tailrace-attempt-journal-{uuid.uuid4().hex[:12]}"
        self._owns_stats = self.config.stats_name is None
        self.stats_name = self.config.stats_name or f"tailrace-latency-stats-{uuid.uuid4().hex[:12]}"
        self.pool: ExecutorPool | None = None
        self.simulator: SimulatorEndpoints | None = None

    @property
    def workflows(self) -> dict[str, WorkflowSpec]:
        """The workflows given at construction, by name (files loaded): what to pass to `run`."""
        return {w.name: w for w in self._workflows}

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> Engine:
        from tailrace.actors.attempt_journal import start_journal
        from tailrace.actors.latency_stats import stats_actor

        connect(self._address)
        if self._simulate:
            self._providers = resolve_providers(self._serving, self._start_simulator())
        self._stats = stats_actor(self.stats_name, self.config.tuning.latency)  # owned here, not by an executor
        self._journal = start_journal(self._journal_name)
        if self.config.budget is not None:
            from tailrace.actors.budget_actor import BudgetHandle, budget_actor

            budget = self.config.budget
            for workflow in self._workflows:  # the limits their providers declare
                budget = budget.for_workflow(workflow)
            self._budget = BudgetHandle(budget, budget_actor(budget))
        self.pool = ExecutorPool(
            self._providers,
            self.config.pool,
            executor_clock=self._executor_clock,
            executor_kwargs={
                "hedge": self.config.hedge,
                "tuning": self.config.tuning,
                "stats_name": self.stats_name,
                "budget": self._budget,
                "shipped": self._shipped,
                "journal_name": self._journal_name,
            },
            runtime_env=self._runtime_env(),
        )
        try:
            await self.pool.start()
            for workflow in self._workflows:
                await self.prepare(workflow)
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Executors hand back their budget leases and last statistics, then stop; the simulator stops."""
        import ray

        pool, self.pool = self.pool, None
        try:
            if pool is not None:
                if self._budget is not None:
                    await _on_every_executor(pool, "shutdown")
                if not self._owns_stats:  # a shared stats actor outlives this engine: hand it the last samples
                    await _on_every_executor(pool, "sync_stats")
                await pool.close()
            for admission in self._admissions.values():
                admission.close()
            if self._owns_stats and self._stats is not None:
                with contextlib.suppress(Exception):  # already gone with its cluster
                    ray.kill(self._stats)
            if self._journal is not None:
                with contextlib.suppress(Exception):  # already gone with its cluster
                    ray.kill(self._journal)
        finally:
            self._stats = None
            self._journal = None
            self._stack.close()

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- runs ----------------------------------------------------------------------------------------

    async def run(
        self,
        workflow: WorkflowSpec,
        inputs: Mapping[str, Any] | RejectedRecord,
        *,
        deadline: float | RunDeadline | None = None,
        options: RunOptions | None = None,
        run_id: str | None = None,
    ) -> RunOutcome:
        """Run one record through `workflow` to its typed outcome. `deadline`: seconds from now, or a
        `RunDeadline` (e.g. derived from your own caller's deadline); default: `options.deadline_s`.
        `options` default to the workflow's `defaults`. A `RejectedRecord` (an input line that cannot be a
        run, from `run_batch`) ends at once, typed `invalid_input`."""
        spec = await self.prepare(workflow)
        options = options or spec.defaults
        run_id = run_id or uuid.uuid4().hex[:16]
        if not isinstance(inputs, RejectedRecord):
            missing = [name for name in spec.inputs if name not in inputs]
            if missing:
                raise InputError(f"run {run_id}: missing input field(s): {', '.join(missing)}")
            inputs = dict(inputs)
        if isinstance(deadline, int | float):
            deadline = RunDeadline.start(float(deadline), SYSTEM_CLOCK, grace_s=self.config.grace_s)
        driver = self._driver(spec, options)
        return await driver.run(run_id, inputs, deadline)

    async def prepare(self, workflow: WorkflowSpec) -> WorkflowSpec:
        """Ship the user code `workflow` names to every executor and have each resolve it; the spec as
        executors run it. Done once per workflow (`run` calls it). Raises `ConfigurationError` naming
        whatever an executor cannot use, and where."""
        if not isinstance(workflow, WorkflowSpec):
            raise TypeError(
                f"expected a WorkflowSpec, got {type(workflow).__name__}: load a workflow file once (it is "
                "then reused), e.g. Engine(workflows=['workflow.yaml']) or load_workflow('workflow.yaml')"
            )
        ready = self._prepared.get(id(workflow))
        if ready is not None:
            return ready
        key = _content_key(workflow)
        if key not in self._preparing:
            self._preparing[key] = asyncio.ensure_future(self._preflight(workflow))
        try:
            ready = await asyncio.shield(self._preparing[key])
        except BaseException:
            self._preparing.pop(key, None)  # a failed preparation is tried again next time
            raise
        self._keep.append(workflow)
        self._prepared[id(workflow)] = ready
        return ready

    async def _preflight(self, workflow: WorkflowSpec) -> WorkflowSpec:
        from tailrace.actors import user_code

        if self.pool is None:
            raise RuntimeError("the engine is not started: use `async with Engine(...)` or `await engine.start()`")
        check_validators_registered(workflow)
        check_schema_models(workflow, allowed=shipped_module_names(self.config.user_modules))
        used = sorted({m.provider for s in workflow.steps for m in s.models})
        missing = [p for p in used if p not in self._providers]
        if missing:
            raise ConfigurationError(
                f"workflow {workflow.name!r} uses provider(s) {', '.join(missing)} that this engine was not "
                f"started with ({', '.join(sorted(self._providers)) or 'none'}): pass it to Engine(workflows=[...])"
            )
        added: dict[str, bytes] = {}
        spec = user_code.capture(workflow, added)
        self._shipped.update(added)  # executors the pool starts from now on get it at start-up
        refs = code_refs(spec)
        handles = self.pool.handles()
        answers = await wait_for(
            asyncio.gather(*(h.preflight.remote(refs, used, added) for h in handles)),
            Deadline.after(120.0, SYSTEM_CLOCK),
        )
        problems = [p for answer in answers for p in answer]
        if problems:
            raise ConfigurationError(_preflight_report(workflow, problems, len(handles)))
        self._keep.append(spec)
        return spec

    def _driver(self, spec: WorkflowSpec, options: RunOptions) -> WorkflowDriver:
        key = (id(spec), options)
        driver = self._drivers.get(key)
        if driver is None:
            assert self.pool is not None
            driver = WorkflowDriver(
                spec,
                options,
                self.pool,
                grace_s=self.config.grace_s,
                hedge=self.config.hedge,
                admission=self._admission(spec),
                journal=self._journal,
            )
            self._drivers[key] = driver
        return driver

    def _admission(self, spec: WorkflowSpec) -> Any:
        if self._budget is None or not self._budget.config.admission:
            return None
        if id(spec) not in self._admissions:
            from tailrace.cluster.budget import BudgetAdmission

            self._admissions[id(spec)] = BudgetAdmission(self._budget.config, spec, self._budget.actor)
        return self._admissions[id(spec)]

    # -- setup ---------------------------------------------------------------------------------------

    def _start_simulator(self) -> SimulatorEndpoints:
        from tailrace.engine.sim import SimServer, scenario

        sim = self._stack.enter_context(SimServer.in_thread(scenario("clean")))
        self.simulator = SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)
        where = sim.openai_base_url.rsplit("/", 1)[0]
        log.warning(
            "tailrace: no provider key or URL is configured (OPENAI_API_KEY, ANTHROPIC_API_KEY, "
            "OPENAI_BASE_URL, ANTHROPIC_BASE_URL): using the built-in provider simulator, scenario 'clean', "
            "at %s (reachable from this machine only)",
            where,
        )
        return self.simulator

    def _runtime_env(self) -> dict[str, Any] | None:
        """The executors' runtime env: the user's modules added to the job's own (which may already ship
        tailrace itself, as `tailrace submit` does), since an actor's `py_modules` replaces the job's."""
        if not self.config.user_modules:
            return None
        import ray
        from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

        # An actor's runtime env takes URIs only: upload the modules as `ray.init(runtime_env=...)` does
        # (Ray's own helper; content-addressed, so an unchanged module is uploaded once per cluster).
        node = ray._private.worker.global_worker.node
        uploaded = upload_py_modules_if_needed(
            {"py_modules": list(self.config.user_modules)},
            include_gitignore=True,
            scratch_dir=node.get_runtime_env_dir_path(),
            logger=log,
        )
        job_env = dict(ray.get_runtime_context().runtime_env or {})
        return {"py_modules": [*job_env.get("py_modules", []), *uploaded["py_modules"]]}


def load_workflow_beside(path: str | Path) -> tuple[WorkflowSpec, list[str]]:
    """Load a workflow file whose user code (validators, schema models named by import path) may live in
    modules next to it: that directory is made importable here, and the modules the spec names from it
    are returned, to ship with the executors (`BatchConfig.user_modules`)."""
    directory = Path(path).resolve().parent
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    workflow = load_workflow(path)
    beside = []
    for step in workflow.steps:
        named = [*step.output.validators, *([step.output.schema_model] if step.output.schema_model else [])]
        for ref in named:
            if not isinstance(ref, str) or ":" not in ref:
                continue
            top = ref.partition(":")[0].split(".")[0]
            for candidate in (directory / f"{top}.py", directory / top):
                if candidate.is_file() or (candidate / "__init__.py").is_file():
                    beside.append(str(candidate))
    return workflow, list(dict.fromkeys(beside))


def shipped_module_names(paths: Iterable[str]) -> list[str]:
    """The top-level module names of user modules shipped with the executors (files or packages)."""
    return [Path(p).stem if p.endswith(".py") else Path(p).name for p in paths]


async def _on_every_executor(pool: ExecutorPool, method: str, within_s: float = 10.0) -> None:
    calls = asyncio.gather(*(getattr(h, method).remote() for h in pool.handles()), return_exceptions=True)
    try:
        for error in await wait_for(calls, Deadline.after(within_s, SYSTEM_CLOCK)):
            if isinstance(error, BaseException):
                log.warning("an executor failed %s: %s", method, type(error).__name__)
    except TimeoutError:
        log.warning("executors did not finish %s within %.0f s", method, within_s)


def _content_key(workflow: WorkflowSpec) -> str:
    text = json.dumps(workflow_json(workflow), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _preflight_report(workflow: WorkflowSpec, problems: list[dict[str, str]], executors: int) -> str:
    """One line per distinct problem, with the executors and nodes that have it."""
    grouped: dict[tuple[str, str, str, str], list[str]] = {}
    for p in problems:
        where = f"{p['executor']} on node {p['node'][:12]} ({p['ip']})"
        grouped.setdefault((p["field"], p["kind"], p["name"], p["problem"]), []).append(where)
    lines = [f"  - {field}: {problem} [{', '.join(wheres)}]" for (field, _, _, problem), wheres in grouped.items()]
    return (
        f"workflow {workflow.name!r} cannot run on {len({w for ws in grouped.values() for w in ws})} of its "
        f"{executors} executors; nothing was started:\n" + "\n".join(lines)
    )
