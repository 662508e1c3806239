"""The Ray-free runtime inside a step executor's process: the step runner that races a step's attempts,
tail control (latency windows, breakers, throttle feeding the hedging policy), the spend gates (run cost
cap, the executor's lease pool on the cluster budget) with their ledgers, and the metrics helpers.

Nothing here starts or calls Ray (metrics go through `ray.util.metrics` lazily, when Ray runs), so all of
it is tested directly; `tailrace.actors` wraps it in actors.
"""

from tailrace.policies.spend import Grant, Refusal, RunCostGate, SpendGate
from tailrace.runtime.step_runner import AttemptObserver, StepRequest, StepRunner
from tailrace.runtime.tail_control import TailControl

__all__ = [
    "AttemptObserver",
    "Grant",
    "Refusal",
    "RunCostGate",
    "SpendGate",
    "StepRequest",
    "StepRunner",
    "TailControl",
]
