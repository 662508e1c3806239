"""The Ray-free runtime inside a step executor's process: the step runner that races a step's attempts,
tail control (latency windows, breakers, throttle feeding the hedging policy), the spend gates (run cost
cap, the executor's lease pool on the cluster budget) with their ledgers, and the metrics helpers.

Nothing here starts or calls Ray (metrics go through `ray.util.metrics` lazily, when Ray runs), so all of
it is tested directly; `tailrace.actors` wraps it in actors.
"""

from __future__ import annotations

from tailrace.engine._lazy import lazy_exports

_EXPORTS = {
    "AttemptObserver": "tailrace.runtime.step_runner",
    "Grant": "tailrace.policies.spend",
    "Refusal": "tailrace.policies.spend",
    "RunCostGate": "tailrace.policies.spend",
    "SpendGate": "tailrace.policies.spend",
    "StepRequest": "tailrace.runtime.step_runner",
    "StepRunner": "tailrace.runtime.step_runner",
    "TailControl": "tailrace.runtime.tail_control",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
