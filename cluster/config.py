"""The typed settings of an engine and of a batch: what used to be 19 keyword arguments of `run_batch`.

`EngineConfig` is what a long-lived `Engine` needs: its executor pool, tail control (hedging and the
executor-wide tuning), the cluster budget, the driver's backstop grace, the shared statistics actor
and the user modules shipped to its executors. `BatchConfig` adds what only a batch has: where the
trace goes and how many runs are in flight at once.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tailrace.cluster.pool import PoolConfig
from tailrace.cluster.trace import TraceConfig
from tailrace.engine.clock import DEFAULT_GRACE_S
from tailrace.engine.specs import HedgeConfig
from tailrace.policies.budget_config import BudgetConfig
from tailrace.policies.hedging import TailTuning


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pool: PoolConfig = Field(default_factory=lambda: PoolConfig.fixed(2))
    hedge: HedgeConfig = Field(default_factory=HedgeConfig)  # executors' default; steps override fields
    tuning: TailTuning = Field(default_factory=TailTuning)  # latency windows, breakers, retry throttle
    budget: BudgetConfig | None = None  # the cluster budget (TPM, RPM, tenants' spend); None: none
    grace_s: float = Field(default=DEFAULT_GRACE_S, gt=0)  # nothing of a run outlives its deadline by more
    # A named latency-statistics actor shared across engines (they start warm from it); None: one per engine.
    stats_name: str | None = None
    # Python modules or packages your workflow names (validators, schema models), shipped to every executor
    # the way Ray ships code: its runtime_env `py_modules`. Paths (a .py file or a package directory) or
    # imported modules.
    user_modules: tuple[str, ...] = ()

    @field_validator("user_modules", mode="before")
    @classmethod
    def _module_paths(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str | Path | ModuleType):
            value = [value]
        return tuple(module_path(m) for m in value)


class BatchConfig(EngineConfig):
    # Every attempt is traced: None = `<out>.trace.jsonl` beside the results, False = no trace.
    trace: TraceConfig | Literal[False] | None = None
    max_in_flight: int = Field(default=64, ge=1)  # runs at once


def module_path(module: str | Path | ModuleType) -> str:
    """Where a module's code is: a package's directory or a module's .py file (what Ray's py_modules takes)."""
    if isinstance(module, ModuleType):
        file = getattr(module, "__file__", None)
        if file is None:
            raise ValueError(f"module {module.__name__!r} has no file to ship")
        path = Path(file)
        return str(path.parent if path.name == "__init__.py" else path)
    path = Path(module).expanduser()
    if "://" in str(module):  # a URI Ray already holds (gcs://, s3://, ...)
        return str(module)
    if not (path.is_dir() or (path.is_file() and path.suffix == ".py")):
        raise ValueError(f"user module {str(module)!r} is neither a package directory nor a .py file")
    return str(path.resolve())
