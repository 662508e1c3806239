"""The dashboard series of runs, steps, attempts, tokens, cost, provider 429s and the executor pool.

One function per event, called where the event happens: `attempt_finished` from the step runner's
attempt record, `step_finished` when a step ends, `run_finished` from the driver, `pool_state` from
the executor pool. Names follow Prometheus conventions and reach the dashboard with a `ray_` prefix
(see `tailrace.runtime.metrics`). Labels stay low-cardinality (workflow, step, provider, model, outcome,
reason), never run ids. Hedge-specific series (duplicates sent/won) live with the hedging code.
"""

from __future__ import annotations

import logging

from tailrace.engine.outcomes import AttemptOutcome, AttemptRecord, ErrorKind, FailureReason, RunOutcome
from tailrace.runtime.metrics import count, gauge, observe

log = logging.getLogger("tailrace")

RUNS = "tailrace_runs_total"
RUN_LATENCY = "tailrace_run_latency_seconds"
DEADLINE_MISSES = "tailrace_deadline_misses_total"
STEPS = "tailrace_steps_total"
STEP_LATENCY = "tailrace_step_latency_seconds"
ATTEMPTS = "tailrace_attempts_total"
ATTEMPT_TTFT = "tailrace_attempt_ttft_seconds"
CANCELLATIONS = "tailrace_cancellations_total"
TOKENS = "tailrace_tokens_total"
TOKENS_WASTED = "tailrace_tokens_wasted_total"
COST = "tailrace_cost_usd_total"
PROVIDER_429 = "tailrace_provider_429_total"
POOL_EXECUTORS = "tailrace_pool_executors"
POOL_BACKLOG = "tailrace_pool_backlog"
POOL_IN_FLIGHT = "tailrace_pool_in_flight_steps"
POOL_SCALE_EVENTS = "tailrace_pool_scale_events_total"

SERIES = (
    RUNS,
    RUN_LATENCY,
    DEADLINE_MISSES,
    STEPS,
    STEP_LATENCY,
    ATTEMPTS,
    ATTEMPT_TTFT,
    CANCELLATIONS,
    TOKENS,
    TOKENS_WASTED,
    COST,
    PROVIDER_429,
    POOL_EXECUTORS,
    POOL_BACKLOG,
    POOL_IN_FLIGHT,
    POOL_SCALE_EVENTS,
)

_429_KINDS = frozenset({ErrorKind.RATE_LIMITED, ErrorKind.QUOTA_EXHAUSTED})


def attempt_finished(workflow: str, record: AttemptRecord) -> None:
    """One attempt ended, whatever became of it: its outcome, tokens, cost, cancel reason, 429."""
    model = {"provider": record.provider, "model": record.model}
    count(
        ATTEMPTS, "Attempts by outcome, model and role", {**model, "outcome": record.outcome.value, "role": record.role}
    )
    count(
        TOKENS,
        "Tokens charged (reported, or conservatively estimated when cancelled)",
        {**model, "kind": "input"},
        record.input_tokens,
    )
    count(
        TOKENS,
        "Tokens charged (reported, or conservatively estimated when cancelled)",
        {**model, "kind": "output"},
        record.output_tokens,
    )
    count(
        COST,
        "Cost in USD (exact total; histogram sums are approximate)",
        {**model, "workflow": workflow},
        record.cost_usd,
    )
    if record.ttft_s is not None:
        observe(ATTEMPT_TTFT, "Time to first token per attempt", model, record.ttft_s)
    if record.outcome == AttemptOutcome.CANCELLED and record.cancel_reason is not None:
        count(CANCELLATIONS, "Attempts cancelled, by reason", {"reason": record.cancel_reason.value})
    if record.error is not None and (record.error.status == 429 or record.error.kind in _429_KINDS):
        count(PROVIDER_429, "Provider 429 answers (rate limit or quota)", {**model, "kind": record.error.kind.value})


def step_finished(
    workflow: str, step: str, ok: bool, latency_s: float, attempts: list[AttemptRecord], winner: int | None
) -> None:
    """A step ended: its latency and outcome, and the tokens of every attempt that did not win."""
    outcome = "ok" if ok else "failed"
    count(STEPS, "Steps by outcome", {"workflow": workflow, "step": step, "outcome": outcome})
    observe(
        STEP_LATENCY,
        "Step latency, from arrival at the executor to its end",
        {"workflow": workflow, "step": step, "outcome": outcome},
        latency_s,
    )
    for record in attempts:
        if record.attempt != winner:
            count(
                TOKENS_WASTED,
                "Tokens of attempts that did not deliver (lost, invalid, failed, cancelled)",
                {"provider": record.provider, "model": record.model},
                record.input_tokens + record.output_tokens,
            )


def run_finished(outcome: RunOutcome) -> None:
    """A run ended: delivered (on time), delivered_late or its failure reason; its latency; a deadline miss."""
    if outcome.delivered:
        label = "delivered" if outcome.on_time else "delivered_late"
    else:
        label = outcome.failure.value if outcome.failure else "failed"
    tags = {"workflow": outcome.workflow, "tenant": outcome.tenant}
    count(RUNS, "Runs by outcome", {**tags, "outcome": label})
    observe(RUN_LATENCY, "End-to-end run latency", {**tags, "outcome": label}, outcome.latency_s)
    late = outcome.delivered and not outcome.on_time
    if late or outcome.failure == FailureReason.DEADLINE_EXCEEDED:
        count(DEADLINE_MISSES, "Runs that failed at their deadline or were delivered after it", tags)


def pool_state(ready: int, starting: int, draining: int, suspect: int, in_flight: int, backlog: int) -> None:
    for state, n in (("ready", ready), ("starting", starting), ("draining", draining), ("suspect", suspect)):
        gauge(POOL_EXECUTORS, "Step executors in the pool, by state", {"state": state}, n)
    gauge(POOL_IN_FLIGHT, "Steps running on the pool's executors", {}, in_flight)
    gauge(POOL_BACKLOG, "Steps waiting for an executor", {}, backlog)


def pool_scaled(direction: str, reason: str) -> None:
    count(POOL_SCALE_EVENTS, "Executor pool changes", {"direction": direction, "reason": reason})


def internal_error(where: str, exc: BaseException) -> None:
    """An exception tailrace did not expect (a bug, never a provider failure): logged with its traceback
    and counted, so it is never silent."""
    log.error("internal error in %s: %s", where, type(exc).__name__, exc_info=exc)
    count("tailrace_internal_errors_total", "Unexpected exceptions caught to keep going, by place", {"where": where})
