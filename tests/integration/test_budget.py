"""The cluster budget end to end: real Ray actors, the simulator's `tpm` scenario (it rejects overruns
with 429), a real redis-server. No overrun, runs refused at once when they cannot make it, spend never
lost across a budget actor restart, one limit for two budget actors on one Redis, and a safe (slower,
never faster) budget while Redis is down."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import ray

from tailrace.actors.budget_actor import RAY_NAMESPACE, find_budget_actor
from tailrace.cluster.api import run_batch, start_executors
from tailrace.cluster.budget import BudgetAdmission, budget_status, ensure_budget
from tailrace.cluster.cli import main as cli
from tailrace.cluster.driver import WorkflowDriver
from tailrace.cluster.providers import SimulatorEndpoints, resolve_providers
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import FailureReason, RunOutcome
from tailrace.engine.specs import RunOptions
from tailrace.policies.budget_config import BudgetConfig, LimitSpec, TenantBudget

pytestmark = pytest.mark.usefixtures("ray_cluster")

TIME_SCALE = 0.05  # one simulated minute = 3 real seconds
TPM = 20_000  # per simulated minute: ~6,700 tokens per real second
WORKFLOW = workflow_from_dict(
    {
        "name": "budgeted",
        "inputs": ["ticket_id"],
        "steps": [
            {
                "id": "draft",
                "prompt": "Draft a short note about ticket {{input.ticket_id}}.",
                "models": [
                    {
                        "provider": "openai",
                        "model": "gpt-4o-mini",
                        "max_tokens": 200,
                        "input_usd_per_mtok": 0.15,
                        "output_usd_per_mtok": 0.6,
                        "expected_ttft_s": 0.1,
                        "expected_latency_s": 0.4,
                    }
                ],
                "output": {"copy_ids": ["ticket_id"]},
            },
            {
                "id": "check",
                "depends_on": ["draft"],
                "prompt": "Check this note: {{steps.draft}}",
                "models": [
                    {
                        "provider": "openai",
                        "model": "gpt-4o-mini",
                        "max_tokens": 200,
                        "input_usd_per_mtok": 0.15,
                        "output_usd_per_mtok": 0.6,
                        "expected_ttft_s": 0.1,
                        "expected_latency_s": 0.4,
                    }
                ],
            },
        ],
    }
)


def budget(name: str, **kw) -> BudgetConfig:
    return BudgetConfig(
        limits=[LimitSpec(account="sim", tpm=TPM)],
        accounts={"openai": "sim", "anthropic": "sim"},
        window_s=60 * TIME_SCALE,
        actor_name=name,
        **kw,
    )


def records(n: int, prefix: str = "r") -> list[dict]:
    return [{"ticket_id": f"T-{i:05d}", "id": f"{prefix}{i}"} for i in range(n)]


def endpoints(sim) -> SimulatorEndpoints:
    return SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)


def overruns(sim) -> int:
    return sum(1 for r in sim.log_records() if r["status"] == 429)


def kill(name: str) -> None:
    actor = find_budget_actor(name)
    if actor is not None:
        ray.kill(actor, no_restart=True)


def test_budget_holds_the_tpm_limit_and_refuses_runs_at_once(simulator):
    sim = simulator("tpm", seed=1, time_scale=TIME_SCALE, tpm_limit=TPM)
    outcomes: list[RunOutcome] = []
    try:
        # 400 runs at once, ~800 tokens each: ~16x what the limit serves in the 8 s deadline.
        summary = run_batch(
            WORKFLOW,
            records(400),
            options=RunOptions(deadline_s=8.0, tenant="acme"),
            simulator=endpoints(sim),
            max_in_flight=400,
            budget=budget("b-limit"),
            on_done=outcomes.append,
        )
        assert overruns(sim) == 0, "the budget let an attempt through that the provider rejected"
        assert summary.delivered > 40
        refused = [o for o in outcomes if o.failure == FailureReason.BUDGET_EXHAUSTED and not o.attempts]
        assert len(refused) > 100
        for o in refused:  # refused at submission: no attempt, no time spent
            assert o.latency_s < 0.5 and "at submission" in (o.detail or "")
        delivered = [o for o in outcomes if o.delivered]
        assert sum(o.on_time for o in delivered) == len(delivered)
        # Tenants' spend is queryable, and is exactly what the outcomes say they cost.
        status = budget_status(name="b-limit")
        assert status.spend["acme"].usd == pytest.approx(sum(o.cost_usd for o in outcomes), rel=1e-6)
        assert status.spend["acme"].attempts == sum(len(o.attempts) for o in outcomes)
    finally:
        kill("b-limit")


def _ladder(provider: str, model: str) -> dict:
    # No latency priors: the spec's defaults (5 s per step), as a new user leaves them.
    return {
        "provider": provider,
        "model": model,
        "max_tokens": 400,
        "input_usd_per_mtok": 1.0,
        "output_usd_per_mtok": 4.0,
    }


DAG = workflow_from_dict(
    {
        "name": "cold_dag",
        "inputs": ["ticket_id", "message"],
        "steps": [
            {
                "id": "classify",
                "prompt": "Classify ticket {{input.ticket_id}}: {{input.message}}",
                "models": [_ladder("openai", "gpt-4o-mini")],
                "output": {"copy_ids": ["ticket_id"]},
            },
            *(
                {"id": s, "depends_on": ["classify"], "prompt": f"{s} of {{{{steps.classify}}}}", "models": [m]}
                for s, m in (
                    ("sentiment", _ladder("anthropic", "claude-haiku-4-5")),
                    ("policy", _ladder("openai", "gpt-4o-mini")),
                    ("facts", _ladder("anthropic", "claude-haiku-4-5")),
                )
            ),
            {
                "id": "reply",
                "depends_on": ["sentiment", "policy", "facts"],
                "prompt": "Reply: {{steps.sentiment}} {{steps.policy}} {{steps.facts}}",
                "models": [_ladder("openai", "gpt-4o-mini")],
            },
            {
                "id": "crm_note",
                "depends_on": ["reply"],
                "prompt": "CRM note: {{steps.reply}}",
                "models": [_ladder("anthropic", "claude-haiku-4-5")],
            },
        ],
    }
)


def test_a_cold_workflow_with_default_priors_and_a_budget_delivers(simulator):
    """Issue 9's new user: a 6-step DAG (4 levels) with the default latency priors (4 x 5 s, far beyond
    the deadline), one `BudgetConfig` for two endpoints that share one key, run as the README shows.
    Nothing is refused on the priors; the runs deliver and the provider's window is never overrun."""
    sim = simulator("tpm", seed=5, time_scale=TIME_SCALE, tpm_limit=60_000)
    budget = BudgetConfig(
        limits=[LimitSpec(account="shared-key", tpm=60_000)],
        accounts={"openai": "shared-key", "anthropic": "shared-key"},
        window_s=60 * TIME_SCALE,
        actor_name="b-cold",
    )
    outcomes: list[RunOutcome] = []
    try:
        summary = run_batch(
            DAG,
            [{"ticket_id": f"T-{i:04d}", "message": "My parcel never came.", "id": f"c{i}"} for i in range(40)],
            options=RunOptions(deadline_s=6.0, tenant="acme"),
            simulator=endpoints(sim),
            max_in_flight=10,
            budget=budget,
            on_done=outcomes.append,
        )
        assert not [o.detail for o in outcomes if o.failure == FailureReason.BUDGET_EXHAUSTED]
        assert summary.delivered == 40 and all(o.on_time for o in outcomes)
        assert overruns(sim) == 0
        apis = {r["api"] for r in sim.log_records()}
        assert apis == {"openai", "anthropic"} and len(sim.stats()["keys"]) == 1  # one key, one window
    finally:
        kill("b-cold")


def test_ledger_spend_is_the_outcomes_cost_over_many_batches_with_faults(simulator):
    """One definition of an attempt's cost: after batches on a faulty provider (5xx, resets, hangs,
    stragglers, invalid answers; hedged duplicates cancelled), the tenant's recorded spend, attempts and
    wasted tokens are exactly what the outcomes say, batch after batch."""
    from tailrace.engine.outcomes import AttemptOutcome
    from tailrace.engine.sim import Fault

    rates = {
        Fault.HTTP_500: 0.05,
        Fault.OVERLOADED: 0.03,
        Fault.RESET: 0.03,
        Fault.HANG: 0.02,
        Fault.STRAGGLER: 0.08,
        Fault.STREAM_ERROR: 0.03,
        Fault.EMPTY: 0.03,
    }
    sim = simulator("tpm", seed=9, time_scale=0.02, tpm_limit=200_000, fault_rates=rates)
    outcomes: list[RunOutcome] = []
    try:
        for batch in range(3):
            run_batch(
                WORKFLOW,
                records(30, prefix=f"b{batch}-"),
                options=RunOptions(deadline_s=4.0, tenant="acme"),
                simulator=endpoints(sim),
                max_in_flight=15,
                budget=budget("b-cost"),
                on_done=outcomes.append,
            )
            spend = budget_status(name="b-cost").spend["acme"]
            attempts = [a for o in outcomes for a in o.attempts]
            assert spend.usd == pytest.approx(sum(o.cost_usd for o in outcomes), rel=1e-9, abs=1e-12), batch
            assert spend.attempts == len(attempts)
            assert spend.input_tokens == sum(a.input_tokens for a in attempts)
            assert spend.output_tokens == sum(a.output_tokens for a in attempts)
            wasted = sum(a.input_tokens + a.output_tokens for a in attempts if a.outcome != AttemptOutcome.VALID)
            assert spend.wasted_tokens == wasted
        kinds = {a.outcome for o in outcomes for a in o.attempts}
        assert {AttemptOutcome.ERROR, AttemptOutcome.VALID} <= kinds  # the faults happened
        failed_early = [
            a for o in outcomes for a in o.attempts if a.outcome == AttemptOutcome.ERROR and not a.output_tokens
        ]
        assert failed_early and all(a.cost_usd == 0 for a in failed_early)  # billed nothing
    finally:
        kill("b-cost")


def test_killing_the_budget_actor_mid_batch_loses_no_spend(simulator, redis_server):
    redis = redis_server(password="kill-test-pw")
    sim = simulator("tpm", seed=2, time_scale=TIME_SCALE, tpm_limit=TPM)
    config = budget("b-kill", redis_url=redis.url, namespace="kill")
    outcomes: list[RunOutcome] = []
    killed = []

    def on_done(outcome: RunOutcome) -> None:
        outcomes.append(outcome)
        if len(outcomes) == 25 and not killed:
            actor = find_budget_actor("b-kill")
            ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1); its state is in Redis
            killed.append(time.monotonic())

    try:
        run_batch(
            WORKFLOW,
            records(120),
            options=RunOptions(deadline_s=30.0, tenant="acme"),
            simulator=endpoints(sim),
            max_in_flight=20,
            budget=config,
            on_done=on_done,
        )
        assert killed
        health = ray.get(find_budget_actor("b-kill").health.remote())
        assert health["restarted"] and health["backend"] == "redis"
        assert "kill-test-pw" not in json.dumps(health)
        assert overruns(sim) == 0
        status = budget_status(redis_url=redis.url, namespace="kill")
        assert status.spend["acme"].attempts == sum(len(o.attempts) for o in outcomes)
        assert status.spend["acme"].usd == pytest.approx(sum(o.cost_usd for o in outcomes), rel=1e-6)
        assert sum(o.delivered for o in outcomes) >= 100
    finally:
        kill("b-kill")


async def _run_driver(driver: WorkflowDriver, recs: list[dict], spacing_s: float) -> list[RunOutcome]:
    tasks = []
    for r in recs:
        tasks.append(asyncio.ensure_future(driver.run(r["id"], r)))
        await asyncio.sleep(spacing_s)
    return list(await asyncio.gather(*tasks))


def test_two_budget_actors_on_one_redis_hold_one_limit(simulator, redis_server):
    """Two clusters' budget actors (two names) and their executors share one provider key through one
    Redis ledger: together they stay under the limit each would use alone."""
    redis = redis_server()
    sim = simulator("tpm", seed=3, time_scale=TIME_SCALE, tpm_limit=TPM)
    providers = resolve_providers(WORKFLOW, endpoints(sim))
    handles = [
        ensure_budget(budget(name, redis_url=redis.url, namespace="shared"), WORKFLOW) for name in ("b-east", "b-west")
    ]
    executors = [start_executors(providers, 1, num_cpus=0.25, budget=h) for h in handles]
    try:
        drivers = [
            WorkflowDriver(
                WORKFLOW,
                RunOptions(deadline_s=6.0, tenant=f"t{i}"),
                ex,
                admission=BudgetAdmission(h.config, WORKFLOW, h.actor),
            )
            for i, (h, ex) in enumerate(zip(handles, executors, strict=True))
        ]

        async def both() -> list[list[RunOutcome]]:
            return list(
                await asyncio.gather(*(_run_driver(d, records(150, f"c{i}-"), 0.01) for i, d in enumerate(drivers)))
            )

        results = asyncio.run(both())
        ray.get([e.shutdown.remote() for ex in executors for e in ex])
        assert overruns(sim) == 0
        delivered = [sum(o.delivered for o in rs) for rs in results]
        assert all(d > 5 for d in delivered), delivered
        charged = next(iter(sim.stats()["keys"].values()))["charged_tokens"]
        elapsed_s = sim.stats()["sim_time_s"] * TIME_SCALE
        assert charged <= TPM + TPM / (60 * TIME_SCALE) * elapsed_s  # one bucket's burst + refill
        status = budget_status(redis_url=redis.url, namespace="shared")
        assert set(status.spend) == {"t0", "t1"}
    finally:
        for ex in executors:
            for e in ex:
                ray.kill(e)
        kill("b-east")
        kill("b-west")


def test_redis_down_mid_run_throttles_and_never_overruns(simulator, redis_server):
    redis = redis_server()
    sim = simulator("tpm", seed=4, time_scale=TIME_SCALE, tpm_limit=TPM)
    config = budget("b-outage", redis_url=redis.url, namespace="outage", redis_fallback_fraction=0.5)
    outcomes: list[RunOutcome] = []
    marks: dict[str, float] = {}

    def on_done(outcome: RunOutcome) -> None:
        outcomes.append(outcome)
        if len(outcomes) == 20 and "down" not in marks:
            redis.stop()
            marks["down"] = time.monotonic()
            marks["charged"] = next(iter(sim.stats()["keys"].values()))["charged_tokens"]

    try:
        run_batch(
            WORKFLOW,
            records(160),
            options=RunOptions(deadline_s=30.0, tenant="acme"),
            simulator=endpoints(sim),
            max_in_flight=40,
            budget=config,
            on_done=on_done,
        )
        ended = time.monotonic()
        assert "down" in marks
        assert overruns(sim) == 0
        health = ray.get(find_budget_actor("b-outage").health.remote())
        assert health["degraded"]
        # While Redis was down the cluster ran on half the rate, from an empty bucket.
        charged = next(iter(sim.stats()["keys"].values()))["charged_tokens"] - marks["charged"]
        rate = TPM / (60 * TIME_SCALE)
        in_flight_at_outage = 40 * 2 * 400  # what was already leased or running when Redis went away
        assert charged <= 0.5 * rate * (ended - marks["down"]) + in_flight_at_outage
        assert sum(o.delivered for o in outcomes) > 60
    finally:
        kill("b-outage")


def test_budget_status_command_reads_redis_without_a_cluster(redis_server, capsys):
    redis = redis_server(password="cli-secret")
    import asyncio as aio

    from tailrace.policies.leases import ExchangeRequest, SpendDelta
    from tailrace.runtime.budget_ledger import RedisLedger

    config = BudgetConfig(tenants={"acme": TenantBudget(daily_usd=5)})

    async def record() -> None:
        ledger = RedisLedger(redis.url, "cli", config.bucket)
        day = time.strftime("%Y-%m-%d", time.gmtime())
        await ledger.exchange(
            ExchangeRequest(
                executor="e",
                report_id="1",
                day=day,
                close=True,
                spend={"acme": SpendDelta(usd=1.25, input_tokens=100, attempts=2)},
            ),
            time.time(),
            "L",
        )
        await ledger.aclose()

    aio.run(record())
    assert cli(["budget", "status", "--redis-url", redis.url, "--namespace", "cli", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["spend"][0]["tenant"] == "acme" and data["spend"][0]["usd"] == pytest.approx(1.25)
    assert "cli-secret" not in out
    bad = redis.url.replace(f":{redis.port}/", ":1/")
    assert cli(["budget", "status", "--redis-url", bad]) == 2
    err = capsys.readouterr().err
    assert "cli-secret" not in err and "***" in err
    assert RAY_NAMESPACE == "tailrace"
