"""The limit of hedging on one latency family: a Monte Carlo of an oracle hedging policy.

Pure Python on a fake clock, no server, no engine: every attempt is drawn from the simulator's own
planner (`plan_response`, the function the server acts out), so the oracle sees exactly the
distribution the contenders see. The oracle knows that distribution (not each draw):

* its backup delays are the true `1 - max_extra_load` quantile of the model's time to first token and
  the `1 - max_extra_load / 2` quantile of its latency (over answers and hangs, as tailrace's triggers);
* a duplicate starts when every running attempt is late (no first token by the first delay, no answer
  by the second, or, `MIN_STREAM_S` after its first token, streaming slower than `SLOW_STREAM` x the
  model's median decode rate), up to `max_duplicates` running duplicates (as tailrace's cap);
* a failure or an invalid answer starts the next attempt at once (a 429's retry-after aside: the oracle
  is not bound by it), on the same model;
* in a brownout it knows the regime: an attempt started while the first rung is degraded goes to the
  first healthy rung. The first *valid* answer wins; the rest are cancelled at that instant.

Runs are placed in simulated time as the benchmark's runs are (about `concurrency` in flight), so a
brownout window falls on the same share of them. Every step of the workflow is played in DAG order.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

from tailrace.engine.dag import Dag
from tailrace.engine.sim import Fault, SimConfig, make_features, plan_response
from tailrace.engine.sim.config import ERROR_FAULTS, INVALID_OUTPUT_FAULTS
from tailrace.engine.specs import WorkflowSpec

MAX_ATTEMPTS = 12
MIN_STREAM_S, SLOW_STREAM = 0.5, 0.4  # tailrace's defaults (HedgeConfig.min_stream_s, slow_stream_factor)


@dataclass(frozen=True)
class Draw:
    """One attempt as the oracle sees it, in simulated seconds after its start."""

    first_token: float  # inf: never (errors, hangs)
    end: float  # inf: never ends (a hang)
    valid: bool
    tokens: int  # billed if it runs to its end
    tokens_per_s: float = math.inf  # decode rate after the first token


@dataclass
class OracleResult:
    latencies: list[float]  # per run, simulated seconds (inf: not delivered)
    extra_load: float  # duplicates sent per attempt that was not a duplicate
    extra_tokens: float  # tokens billed beyond the winning answers, as a fraction of them
    delays: dict[str, tuple[float, float, float]]  # per model: TTFT and latency delays, median decode rate


def _draw(config: SimConfig, model: str, key: str, sim_time: float, prompt_tokens: int, max_tokens: int) -> Draw:
    features = make_features("openai", model, [key + " " * max(0, prompt_tokens * 4 - len(key))], max_tokens)
    plan = plan_response(config, features, 0, sim_time=sim_time, forced=config.force_fault.get(model))
    prompt = features.prompt_tokens
    if plan.fault in ERROR_FAULTS or plan.fault == Fault.RESET:
        return Draw(math.inf, plan.ttft_s, False, prompt)
    if plan.fault == Fault.HANG:
        return Draw(math.inf, math.inf, False, prompt)
    if plan.fault == Fault.STREAM_ERROR:
        return Draw(plan.ttft_s, plan.ttft_s + plan.generation_s / 2, False, prompt + plan.output_tokens // 2)
    valid = plan.fault not in INVALID_OUTPUT_FAULTS
    rate = plan.output_tokens / max(1e-9, plan.total_s - plan.ttft_s)
    return Draw(plan.ttft_s, plan.total_s, valid, prompt + plan.output_tokens, rate)


def backup_delays(config: SimConfig, model: str, max_extra_load: float, n: int = 20_000) -> tuple[float, float, float]:
    """The true `1 - max_extra_load` quantile of the model's time to first token and `1 - max_extra_load / 2`
    quantile of its latency over the attempts that did not fail fast (answers and hangs, a hang being
    slower than any answer: as tailrace's censored windows, and the same budget: that share of attempts
    is backed up), and the median decode rate; outside any brownout (sim time -1)."""
    draws = [_draw(config, model, f"quantile-{i}", -1.0, 150, 400) for i in range(n)]
    waited = [d for d in draws if math.isfinite(d.first_token) or not math.isfinite(d.end)]
    firsts = sorted(d.first_token for d in waited)
    ends = sorted(d.end for d in waited)
    rates = sorted(d.tokens_per_s for d in draws if math.isfinite(d.tokens_per_s))

    def q(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, math.ceil(p * len(values)) - 1)]

    return q(firsts, 1 - max_extra_load), q(ends, 1 - max_extra_load / 2), q(rates, 0.5)


def _step(
    config: SimConfig,
    rungs: list[str],
    delays: dict[str, tuple[float, float, float]],
    key: str,
    start: float,
    max_duplicates: int,
) -> tuple[float, int, int, int, int]:
    """Play one step from `start`: (latency, duplicates sent, other extra attempts, tokens billed beyond
    the winner, the winner's tokens)."""

    def model_at(t: float) -> str:
        b = config.brownout
        for m in rungs:
            if b is None or not b.degraded(m, t):
                return m
        return rungs[-1]

    running: list[tuple[float, Draw, str, bool]] = []  # (start, draw, model, duplicate)
    events: list[tuple[float, int, str]] = []  # (time, order, what)
    sent = dups = others = wasted = 0

    def launch(t: float, duplicate: bool) -> None:
        nonlocal sent, dups, others
        model = model_at(t)
        draw = _draw(config, model, f"{key}-{sent}", t, 150, 400)
        sent += 1
        dups += duplicate
        others += not duplicate
        running.append((t, draw, model, duplicate))
        if math.isfinite(draw.end):
            heapq.heappush(events, (t + draw.end, sent, "end"))
        heapq.heappush(events, (t + delays[model][0], sent, "trigger"))
        heapq.heappush(events, (t + delays[model][1], sent, "trigger"))
        if math.isfinite(draw.first_token):
            heapq.heappush(events, (t + draw.first_token + MIN_STREAM_S, sent, "trigger"))

    def late(s: float, d: Draw, m: str, now: float) -> bool:
        ttft, latency, rate = delays[m]
        if now - s >= latency - 1e-9:
            return True
        if s + d.first_token > now:
            return now - s >= ttft - 1e-9
        return now - (s + d.first_token) >= MIN_STREAM_S - 1e-9 and d.tokens_per_s < SLOW_STREAM * rate

    launch(start, False)
    while events:
        now, _, what = heapq.heappop(events)
        if what == "end":
            finished = [r for r in running if r[0] + r[1].end == now]
            for r in finished:
                running.remove(r)
                if r[1].valid:
                    # Every other attempt is cancelled now: billed the prompt and what it streamed so far.
                    for s, d, _, _ in running:
                        wasted += _tokens_until(d, now - s)
                    return now - start, dups, others - 1, wasted, r[1].tokens
                wasted += r[1].tokens
                if sent < MAX_ATTEMPTS and all(late(s, d, m, now) for s, d, m, _ in running):
                    launch(now, False)  # recovery: not speculation
            if not running and sent < MAX_ATTEMPTS:
                launch(now, False)
            continue
        all_late = all(late(s, d, m, now) for s, d, m, _ in running)
        speculative = sum(1 for *_, dup in running if dup)
        room = len(running) < max_duplicates + 1 and sent < MAX_ATTEMPTS
        if running and all_late and speculative < max_duplicates and room:
            launch(now, True)
    return math.inf, dups, others - 1, wasted, 0


def _tokens_until(draw: Draw, elapsed: float) -> int:
    """What a cancelled attempt is billed: its share of the answer streamed by `elapsed` (prompt included)."""
    if not math.isfinite(draw.end) or elapsed >= draw.end:
        return draw.tokens if math.isfinite(draw.end) else 150
    if elapsed <= draw.first_token:
        return 150
    return 150 + int((draw.tokens - 150) * (elapsed - draw.first_token) / max(1e-9, draw.end - draw.first_token))


def oracle_limit(
    config: SimConfig,
    workflow: WorkflowSpec,
    runs: int,
    *,
    max_extra_load: float,
    max_duplicates: int = 2,
    concurrency: int = 16,
    seed_key: str = "oracle",
) -> OracleResult:
    dag = Dag.from_spec(workflow)
    rungs = {s.id: [m.model for m in s.models] for s in workflow.steps}
    models = {m for r in rungs.values() for m in r}
    delays = {m: backup_delays(config, m, max_extra_load) for m in models}
    latencies: list[float] = []
    dups = others = wasted = winners = answer_tokens = 0
    arrival = 0.0
    for i in range(runs):
        finish: dict[str, float] = {}
        for step in dag.topological_order():
            ready = max((finish[p] for p in dag.parents(step)), default=arrival)
            latency, d, o, w, won = _step(config, rungs[step], delays, f"{seed_key}-{i}-{step}", ready, max_duplicates)
            dups, others, wasted, answer_tokens = dups + d, others + o, wasted + w, answer_tokens + won
            winners += 1
            finish[step] = ready + latency
        run = max(finish.values()) - arrival
        latencies.append(run)
        # The next run starts as the benchmark's would: about `concurrency` in flight.
        arrival += (run if math.isfinite(run) else 30.0) / concurrency
    return OracleResult(
        latencies=latencies,
        extra_load=dups / max(1, winners + others),
        extra_tokens=wasted / max(1, answer_tokens),
        delays=delays,
    )


def summary(result: OracleResult) -> dict[str, Any]:
    lat = sorted(result.latencies)

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, max(0, math.ceil(p * len(lat)) - 1))]

    p50 = q(0.5)
    return {
        "p50": p50,
        "p90": q(0.9),
        "p99": q(0.99),
        "p99.9": q(0.999),
        "p99/p50": q(0.99) / p50,
        "p99.9/p50": q(0.999) / p50,
        "extra_load": result.extra_load,
        "delays": result.delays,
        "latencies_sim_s": lat,
    }
