"""Goodput under a real TPM quota: tailrace's cluster budget vs per-process limiting vs no budget at all.

Two workloads, each offered at 1.5x and 3x the quota (of what it allows over the arrival window, its
one-minute burst included), bursty (both tenants' arrivals come in 2 s bursts every 4 s, out of phase
by 1 s, so each is alone a quarter of the time), from two tenants with weights gold 2 : std 1:

* **2-step**: triage then reply (`gpt-4o-mini`, `max_tokens` 160), deadline 20 simulated seconds.
* **6-step DAG**: classify; sentiment, policy and facts in parallel; reply; CRM note (4 levels),
  `max_tokens` 400 (about three times what a step uses), half the steps on the OpenAI endpoint and
  half on the Anthropic one with the same key, deadline 30 simulated seconds.

Every model keeps its *default* latency priors: nothing is tuned for tailrace. The simulator runs in
its own process (scenario `tpm`: 100,000 tokens per simulated minute per key, prompt + max_tokens
charged at admission and corrected to use at the end, 429 with retry-after and `x-ratelimit-*`
headers when the window is full; one window for both endpoints). Each contender gets a fresh
simulator and the same arrival times:

* **tailrace**: `BudgetConfig` with the quota, admission on, executors leasing from the budget actor.
* **tailrace, admission off**: the same budget with `admission=False` (every run starts; attempts wait
  for budget until their deadline): shows the ledger alone keeps the provider's window (0 429s).
* **per-process**: each of the N executors limits itself to quota / N with a local token bucket charged
  prompt + max_tokens and never refunded (what a user would write), waiting for tokens until the run's
  deadline; no admission.
* **no budget**: the same executors with no budget at all (the engine's retries honour Retry-After).

Reported per workload, load and contender: runs delivered on time; **goodput** (runs delivered on
time per quota-minute) and the **goodput limit** (the quota over the tokens a delivered run uses, over
the batch's span: from the first arrival to the last run's end, burst included), and their ratio;
429s caused; tokens wasted on runs that did not deliver on time (share of all tokens); refusal latency;
the gold:std split of delivered tokens among runs that arrived while both tenants were being refused
(1 s bins of arrivals in which tailrace refused runs of each tenant: both backlogged, i.e. contention);
admitted runs that failed for budget; the provider's free share of the quota when runs were refused.

    python benchmarks/tpm.py [--minutes 1.5] [--loads 1.5 3] [--workloads 2-step "6-step DAG"] [--only tailrace]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _sim_process import free_port, serving

from tailrace.engine.clock import SYSTEM_CLOCK, Deadline
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import FailureReason, RunOutcome
from tailrace.engine.specs import RunOptions, WorkflowSpec
from tailrace.policies.buckets import TokenBucket
from tailrace.policies.budget_config import BudgetConfig, LimitSpec, TenantBudget, reserve_amount
from tailrace.policies.spend import Grant, Refusal, SpendAsk, Usage

SIM_TPM = 100_000  # the `tpm` scenario's quota, per simulated minute, per API key
WEIGHTS = {"gold": 2.0, "std": 1.0}
BURST_ON_S, BURST_PERIOD_S = 2.0, 4.0
PHASES = {"gold": 0.0, "std": 1.0}
CONTENDERS = ("tailrace", "tailrace, admission off", "per-process", "no budget")


def _model(provider: str, model: str, max_tokens: int, prices: tuple[float, float]) -> dict[str, Any]:
    # No latency priors: the defaults, as a new user leaves them.
    return {
        "provider": provider,
        "model": model,
        "max_tokens": max_tokens,
        "input_usd_per_mtok": prices[0],
        "output_usd_per_mtok": prices[1],
    }


MINI = _model("openai", "gpt-4o-mini", 160, (0.15, 0.6))
OA = _model("openai", "gpt-4o-mini", 400, (0.15, 0.6))
AN = _model("anthropic", "claude-haiku-4-5", 400, (1.0, 5.0))

TWO_STEP = workflow_from_dict(
    {
        "name": "tpm_two_step",
        "inputs": ["ticket_id", "message"],
        "steps": [
            {
                "id": "triage",
                "prompt": "Triage ticket {{input.ticket_id}}: {{input.message}}",
                "models": [MINI],
                "output": {"copy_ids": ["ticket_id"]},
            },
            {"id": "reply", "depends_on": ["triage"], "prompt": "Reply, given: {{steps.triage}}", "models": [MINI]},
        ],
    }
)
DAG = workflow_from_dict(
    {
        "name": "tpm_dag",
        "inputs": ["ticket_id", "message"],
        "steps": [
            {
                "id": "classify",
                "prompt": "Classify ticket {{input.ticket_id}}: {{input.message}}",
                "models": [OA],
                "output": {"copy_ids": ["ticket_id"]},
            },
            {
                "id": "sentiment",
                "depends_on": ["classify"],
                "prompt": "Rate the customer's sentiment: {{input.message}}",
                "models": [AN],
            },
            {
                "id": "policy",
                "depends_on": ["classify"],
                "prompt": "Quote the shop policy for this ticket: {{steps.classify}}",
                "models": [OA],
            },
            {
                "id": "facts",
                "depends_on": ["classify"],
                "prompt": "List the facts stated in: {{input.message}}",
                "models": [AN],
            },
            {
                "id": "reply",
                "depends_on": ["sentiment", "policy", "facts"],
                "prompt": "Reply to the customer. Sentiment: {{steps.sentiment}} Policy: {{steps.policy}} "
                "Facts: {{steps.facts}}",
                "models": [OA],
            },
            {
                "id": "crm_note",
                "depends_on": ["reply"],
                "prompt": "Write the CRM note for ticket {{input.ticket_id}} after this reply: {{steps.reply}}",
                "models": [AN],
            },
        ],
    }
)


@dataclass(frozen=True)
class Workload:
    name: str
    workflow: WorkflowSpec
    deadline_sim_s: float
    tokens_per_run: float  # what a delivered run uses, roughly: sets the arrival rate for a given load
    # Real seconds per simulated second: the 2-step runs are small, so their rate in runs per real second
    # is kept where one shared 2-core machine serves it (the engine's own throughput is not what is measured).
    time_scale: float


WORKLOADS = {
    "2-step": Workload("2-step", TWO_STEP, 20.0, 330.0, 1.0),
    "6-step DAG": Workload("6-step DAG", DAG, 30.0, 1_700.0, 0.5),
}


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- the simulator in its own process, with the quota reported over time -----------------------------


@contextlib.contextmanager
def simulator(seed: int, time_scale: float, log: str) -> Iterator[str]:
    port = free_port()
    code = (
        "import sys; from tailrace.engine.sim import scenario; from tailrace.engine.sim.server import run_forever; "
        f"run_forever(scenario('tpm', seed={seed}, time_scale={time_scale}, tpm_limit={SIM_TPM}), "
        f"port={port}, log_path={log!r})"
    )
    with serving([sys.executable, "-c", code], port) as root:
        yield root


class WindowSampler:
    """Polls the simulator's /stats: the quota's free share over time (to judge refusals against)."""

    def __init__(self, root: str, interval_s: float = 0.1) -> None:
        self._root = root
        self._interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (monotonic, free share of the quota)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WindowSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):  # a sample missed is a sample missed
                stats = json.loads(urllib.request.urlopen(self._root + "/stats", timeout=1).read())
                for key in stats.get("keys", {}).values():
                    self.samples.append((time.monotonic(), 1.0 - key["window_tokens"] / key["tpm_limit"]))
            self._stop.wait(self._interval_s)

    def free_at(self, t: float) -> float:
        if not self.samples:
            return 1.0  # nothing charged yet: the key is not even known
        best = min(self.samples, key=lambda s: abs(s[0] - t))
        return best[1] if abs(best[0] - t) < 1.0 else math.nan


# ---- the per-process baseline: a local token bucket per executor, quota / N each ---------------------


class _LocalBucketGate:
    """What a user would write: a local token bucket (aiolimiter-style), charged prompt + max_tokens and
    never refunded, waiting for tokens until the run's deadline."""

    def __init__(self, config: BudgetConfig, share: float) -> None:
        self._config = config
        self._share = share
        self._buckets: dict[str, TokenBucket] = {}
        self._lock: asyncio.Lock | None = None

    def gate(self, continuing: bool = False) -> Any:
        return self

    def snapshot(self) -> dict[str, Any]:
        return {"mode": "per-process"}

    async def aclose(self) -> None:
        return None

    async def reserve(self, ask: SpendAsk) -> Grant | Refusal:
        now = SYSTEM_CLOCK.monotonic()
        deadline = Deadline(ask.deadline_at, SYSTEM_CLOCK)
        specs = self._config.buckets_for(ask.provider, ask.model)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # FIFO: first come, first served
            for spec in specs:
                if spec.key not in self._buckets:
                    self._buckets[spec.key] = TokenBucket.full(
                        spec.capacity * self._share, spec.rate_per_s * self._share, now
                    )
            while True:
                now = SYSTEM_CLOCK.monotonic()
                wait = max((self._buckets[s.key].seconds_until(reserve_amount(s, ask), now) for s in specs), default=0)
                if wait <= 0:
                    for s in specs:
                        b = self._buckets[s.key]
                        b.take(reserve_amount(s, ask), now)
                        b.spend(reserve_amount(s, ask), now)
                    return Grant(ask)
                if wait > deadline.remaining():
                    return Refusal("budget_exhausted: the local limiter has no tokens before the deadline")
                await asyncio.sleep(min(wait, 0.05))

    async def settle(self, grant: Grant, used: Usage) -> None:
        return None  # charged at admission


@dataclass(frozen=True)
class PerProcessLimit:
    """Passed to executors where a `BudgetHandle` would go."""

    config: BudgetConfig
    executors: int

    def executor_gate(self, executor_id: str) -> _LocalBucketGate:
        return _LocalBucketGate(self.config, 1.0 / self.executors)


# ---- workload ---------------------------------------------------------------------------------------


def bursting(tenant: str, t: float) -> bool:
    return ((t + PHASES[tenant]) % BURST_PERIOD_S) < BURST_ON_S


def arrivals(seconds: float, runs_per_s: float, seed: int) -> list[tuple[float, str]]:
    """Poisson arrivals per tenant, each offering half the load, in its bursts only (at twice the mean)."""
    rng = random.Random(seed)
    out = []
    for tenant in WEIGHTS:
        t = 0.0
        rate_in_burst = (runs_per_s / 2) * BURST_PERIOD_S / BURST_ON_S
        while t < seconds:
            t += rng.expovariate(rate_in_burst)
            if t < seconds and bursting(tenant, t):
                out.append((t, tenant))
    return sorted(out)


def refused(o: RunOutcome) -> bool:
    return o.failure == FailureReason.BUDGET_EXHAUSTED and "at submission" in (o.detail or "")


def tokens(o: RunOutcome) -> int:
    return sum(a.input_tokens + a.output_tokens for a in o.attempts)


@dataclass
class Result:
    workload: str
    load: float
    name: str
    outcomes: list[tuple[float, RunOutcome]] = field(default_factory=list)  # (scheduled arrival, outcome)
    refusal_latency_s: list[float] = field(default_factory=list)  # scheduled arrival -> refused
    refusal_free: list[float] = field(default_factory=list)  # the provider's free share at each refusal
    overrun_429: int = 0
    span_s: float = 0.0  # first arrival to the last run's end (real seconds)
    charged: float = 0.0  # tokens the provider kept charged (after its corrections)


async def drive(
    drivers: dict[str, Any], plan: list[tuple[float, str]], msgs: list[str], result: Result, sampler: WindowSampler
) -> float:
    t0 = time.monotonic()
    tasks = []

    async def one(i: int, at: float, tenant: str) -> None:
        record = {"ticket_id": f"T-{i:06d}", "message": msgs[i % len(msgs)]}
        outcome = await drivers[tenant].run(f"{tenant}-{i}", record)
        result.outcomes.append((at, outcome))
        if refused(outcome):
            now = time.monotonic()
            result.refusal_latency_s.append(now - (t0 + at))
            result.refusal_free.append(sampler.free_at(now))

    for i, (at, tenant) in enumerate(plan):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, at, tenant)))
    await asyncio.gather(*tasks)
    return time.monotonic() - t0


def run_contender(
    name: str,
    workload: Workload,
    load: float,
    plan: list[tuple[float, str]],
    args: argparse.Namespace,
    scale: float,
    tmp: str,
) -> Result:
    import ray

    from tailrace.actors.budget_actor import find_budget_actor
    from tailrace.cluster.api import start_executors
    from tailrace.cluster.budget import BudgetAdmission, ensure_budget
    from tailrace.cluster.driver import WorkflowDriver
    from tailrace.cluster.providers import SimulatorEndpoints, resolve_providers

    workflow = workload.workflow
    config = BudgetConfig(
        limits=[LimitSpec(account="sim", tpm=SIM_TPM)],
        accounts={"openai": "sim", "anthropic": "sim"},
        window_s=60 * scale,
        tenants={t: TenantBudget(weight=w) for t, w in WEIGHTS.items()},
        actor_name=f"bench-{os.getpid()}-{len(os.listdir(tmp))}",
        **({"admission_margin": args.margin} if args.margin is not None else {}),
    )
    log = f"{tmp}/{len(os.listdir(tmp))}.jsonl"
    result = Result(workload.name, load, name)
    msgs = [
        ("My order arrived damaged and I would like a replacement or a refund, please. " * 2)[: 80 + 7 * k]
        for k in range(10)
    ]
    deadline_s = workload.deadline_sim_s * scale
    with simulator(args.seed, scale, log) as root, WindowSampler(root) as sampler:
        providers = resolve_providers(workflow, SimulatorEndpoints(root + "/v1", root))
        admission = None
        if name.startswith("tailrace"):
            if name != "tailrace":
                config = config.model_copy(update={"admission": False})
            handle = ensure_budget(config, workflow)
            pool = start_executors(providers, args.executors, budget=handle)
            if handle.config.admission:
                admission = BudgetAdmission(handle.config, workflow, handle.actor)
        elif name == "per-process":
            limit = PerProcessLimit(config.for_workflow(workflow), args.executors)
            pool = start_executors(providers, args.executors, budget=limit)
        else:
            pool = start_executors(providers, args.executors)
        drivers = {
            t: WorkflowDriver(workflow, RunOptions(deadline_s=deadline_s, tenant=t), pool, admission=admission)
            for t in WEIGHTS
        }
        result.span_s = asyncio.run(drive(drivers, plan, msgs, result, sampler))
        if admission is not None:
            admission.close()
        ray.get([e.shutdown.remote() for e in pool], timeout=60)
        for e in pool:
            ray.kill(e)
        actor = find_budget_actor(config.actor_name)
        if actor is not None:
            ray.kill(actor)
    if os.environ.get("TPM_BENCH_DEBUG"):
        for at, o in result.outcomes:
            if not refused(o) and not (o.delivered and o.on_time):
                steps = sorted(
                    (round(a.started_at - o.started_at, 2), a.step_id, round(a.latency_s, 2)) for a in o.attempts
                )
                print(f"    {o.run_id} at {at:.2f}: {o.failure} {o.detail} latency {o.latency_s:.2f} steps {steps}")
    for line in Path(log).read_text().splitlines():
        r = json.loads(line)
        if r["status"] == 429 and r.get("limited") in ("tokens", "requests"):
            result.overrun_429 += 1
        elif r["status"] != 429:
            result.charged += r["input_tokens"] + r["output_tokens"]
    return result


# ---- the report -------------------------------------------------------------------------------------


@dataclass
class Row:
    result: Result
    delivered: int
    runs: int
    refused: int
    admitted_budget_failures: int
    goodput: float  # runs delivered on time per quota-minute
    limit: float  # quota / tokens per delivered run, per quota-minute
    wasted_share: float
    share: float  # gold:std delivered tokens of runs that arrived while both tenants were backlogged

    @property
    def ratio(self) -> float:
        return self.goodput / self.limit if self.limit > 0 else math.nan


CONTENTION_BIN_S = 1.0


def contended_bins(r: Result) -> set[int]:
    """Arrival bins in which runs of every tenant were refused: each asked for more than it got."""
    refused_by: dict[int, set[str]] = {}
    for at, o in r.outcomes:
        if refused(o):
            refused_by.setdefault(int(at / CONTENTION_BIN_S), set()).add(o.tenant)
    return {b for b, tenants in refused_by.items() if tenants >= set(WEIGHTS)}


def summarise(r: Result, time_scale: float, contended: set[int]) -> Row:
    outcomes = [o for _, o in r.outcomes]
    on_time = [o for o in outcomes if o.delivered and o.on_time]
    used = sum(tokens(o) for o in outcomes)
    per_run = sum(tokens(o) for o in on_time) / max(1, len(on_time))
    window_s = 60 * time_scale
    allowed = SIM_TPM + SIM_TPM / window_s * r.span_s  # burst + refill over the span
    quota_minutes = allowed / SIM_TPM
    goodput = len(on_time) / quota_minutes
    limit = SIM_TPM / per_run if per_run > 0 else math.nan
    wasted = sum(tokens(o) for o in outcomes if not (o.delivered and o.on_time))
    both = {t: 0 for t in WEIGHTS}
    for at, o in r.outcomes:
        if o.delivered and o.on_time and int(at / CONTENTION_BIN_S) in contended:
            both[o.tenant] += tokens(o)
    budget_failures = sum(
        1 for o in outcomes if o.failure == FailureReason.BUDGET_EXHAUSTED and "at submission" not in (o.detail or "")
    )
    return Row(
        r,
        len(on_time),
        len(outcomes),
        sum(refused(o) for o in outcomes),
        budget_failures,
        goodput,
        limit,
        wasted / used if used else 0.0,
        both["gold"] / both["std"] if both["std"] else math.inf,
    )


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print(
        "\n| workload | load | contender | runs | delivered on time | refused at submission | admitted, failed for "
        "budget | goodput (runs / quota-min) | goodput limit | goodput / limit | 429s caused | tokens wasted | "
        "refusal ms p50 / p99 / max | provider free at refusals (median) | gold:std (under contention) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        r = row.result
        lat = [o.latency_s for _, o in r.outcomes if refused(o)]
        refusal = f"{pct(lat, 0.5) * 1e3:.2f} / {pct(lat, 0.99) * 1e3:.2f} / {max(lat) * 1e3:.1f}" if lat else "-"
        free = [f for f in r.refusal_free if not math.isnan(f)]
        print(
            f"| {r.workload} | {r.load:g}x | {r.name} | {row.runs} | {row.delivered} | {row.refused} | "
            f"{row.admitted_budget_failures} | {row.goodput:.1f} | {row.limit:.1f} | {row.ratio:.1%} | "
            f"{r.overrun_429} | {row.wasted_share:.1%} | {refusal} | "
            f"{f'{pct(free, 0.5):.1%}' if free else '-'} | {row.share:.2f} |"
        )
    print(
        "\nTargets (tailrace): goodput >= 90% of the limit and above 'no budget'; 0 429s caused; tokens wasted "
        "<= 10%; every refusal at submission (0 admitted runs failed for budget); gold:std within 10% of 2.0."
    )
    for row in rows:
        if row.result.name != "tailrace":
            continue
        same = (row.result.workload, row.result.load)
        none = next(
            (x for x in rows if x.result.name == "no budget" and (x.result.workload, x.result.load) == same), None
        )
        checks = {
            "goodput >= 90% of limit": row.ratio >= 0.9,
            "above no budget": none is None or row.goodput > none.goodput,
            "0 429s": row.result.overrun_429 == 0,
            "wasted <= 10%": row.wasted_share <= 0.10,
            "no admitted run failed for budget": row.admitted_budget_failures == 0,
            "gold:std within 10% of 2": abs(row.share - 2.0) <= 0.2,
        }
        missed = [k for k, ok in checks.items() if not ok]
        print(
            f"- {row.result.workload} at {row.result.load:g}x: "
            + ("all met" if not missed else "missed: " + ", ".join(missed))
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=1.5, help="arrival window, in (simulated) quota-minutes")
    parser.add_argument("--time-scale", type=float, help="simulator time scale (default: per workload)")
    parser.add_argument("--executors", type=int, default=2)
    parser.add_argument("--loads", type=float, nargs="+", default=[1.5, 3.0], help="offered load, x the quota")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--margin", type=float, help="BudgetConfig.admission_margin (default: the config's)")
    parser.add_argument("--only", choices=CONTENDERS, action="append", help="run these contenders only")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    logging.basicConfig(level=logging.ERROR)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    started = time.monotonic()
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for wl_name in args.workloads:
            workload = WORKLOADS[wl_name]
            scale = args.time_scale or workload.time_scale
            rate = SIM_TPM / (60 * scale)  # tokens per real second
            seconds = args.minutes * 60 * scale
            for load in args.loads:
                # `load` x what the quota allows over the arrival window (its burst included, so "1.5x" is an
                # overload even over a short window): runs per second for a run of `tokens_per_run`.
                offered = load * (SIM_TPM + rate * seconds) / seconds / workload.tokens_per_run
                plan = arrivals(seconds, offered, args.seed)
                contended: set[int] = set()  # from tailrace's refusals; the same arrivals for every contender
                for name in CONTENDERS:
                    if args.only and name not in args.only:
                        continue
                    result = run_contender(name, workload, load, plan, args, scale, tmp)
                    if name == "tailrace":
                        contended = contended_bins(result)
                    rows.append(summarise(result, scale, contended))
                    failures: dict[str, int] = {}
                    for _, o in result.outcomes:
                        if not refused(o) and not (o.delivered and o.on_time):
                            why = o.failure.value if o.failure else "late"
                            failures[why] = failures.get(why, 0) + 1
                    allowed = SIM_TPM + rate * result.span_s
                    print(
                        f"  {wl_name} {load:g}x {name} (time scale {scale:g}, {seconds:.0f} s of arrivals): "
                        f"{rows[-1].delivered}/{rows[-1].runs} on time, "
                        f"{rows[-1].ratio:.1%} of the goodput limit, {result.overrun_429} 429s, provider charged "
                        f"{result.charged / allowed:.1%} of the quota over {result.span_s:.1f} s, admitted and failed: "
                        f"{failures or 'none'}; load average {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    report(rows, args)
    print(f"\n{time.monotonic() - started:.0f} s; load average after: {os.getloadavg()}")
    ray.shutdown()


if __name__ == "__main__":
    main()
