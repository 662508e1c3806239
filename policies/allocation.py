"""Sharing a run's remaining time and extra-token allowance among its steps.

Time: a step may plan to use `w(step) / remaining_critical_path(step)` of the time left when it starts,
where weights are expected step latencies. The first step of a three-step chain gets a third, not all
of it, so a slow first step drops to a faster model instead of eating the time its successors need.
The share is a planning figure for choosing rungs, never a hard stop: the run's deadline is.

Tokens: the run's allowance for duplicates and retries (a fraction of its expected tokens) is split
among the steps running at once, so parallel steps cannot each spend all of it.
"""

from __future__ import annotations

from collections.abc import Mapping

from tailrace.engine.dag import Dag
from tailrace.engine.specs import StepSpec, WorkflowSpec
from tailrace.policies.throttle import expected_step_tokens


def step_weights(workflow: WorkflowSpec) -> dict[str, float]:
    """Expected duration of each step: its first rung's latency prior."""
    return {s.id: s.models[0].expected_latency_s for s in workflow.steps}


def time_shares(dag: Dag, weights: Mapping[str, float]) -> dict[str, float]:
    """Per step, the fraction of the run's remaining time it may plan to use when it starts."""
    rest = dag.remaining_critical_paths(weights)
    return {n: (weights[n] / rest[n] if rest[n] > 0 else 1.0) for n in dag.nodes}


def step_extra_tokens(step: StepSpec, inputs: Mapping[str, object], fraction: float) -> int:
    """One step's part of its run's allowance for duplicates and retries: `fraction` of its expected tokens."""
    return int(fraction * expected_step_tokens(step, inputs))


def split_extra_tokens(free: int, starting: int) -> int:
    """Each of `starting` steps dispatched together gets an equal part of what is not held by others."""
    return max(0, free) // max(1, starting)
