"""The cluster budget under real faults: the budget actor killed (Ray restarts it) and killed for good,
with and without Redis; Redis stopped and restarted with its data, and restarted empty. Real Ray
actors, the simulator's `tpm` scenario, real redis-servers.

Every case checks what must hold whatever happens: each run ends, typed, by its deadline + grace; the
results file has each run exactly once; the provider never rejected an attempt for the quota; every
ledger adds up (`granted = spent + returned + written_off + outstanding`, per bucket); free + leased
never exceeds the limit; and where the ledger survived, tenants' recorded spend is the outcomes' cost.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray

from tailrace.actors.budget_actor import find_budget_actor
from tailrace.cluster.api import run_batch
from tailrace.cluster.budget import budget_status
from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.engine.clock import DEFAULT_GRACE_S
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import FailureReason, RunOutcome
from tailrace.engine.specs import RunOptions
from tailrace.policies.budget_config import BudgetConfig, LimitSpec
from tailrace.runtime.budget_ledger import LedgerStatus

pytestmark = pytest.mark.usefixtures("ray_cluster")

TIME_SCALE = 0.05  # one simulated minute = 3 real seconds
TPM = 30_000  # 10,000 tokens per real second: the budget binds now and then, runs stay short
DEADLINE_S = 10.0
RUNS = 48
_MODEL = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "max_tokens": 200,
    "input_usd_per_mtok": 0.15,
    "output_usd_per_mtok": 0.6,
}
WORKFLOW = workflow_from_dict(
    {
        "name": "faults",
        "inputs": ["ticket_id"],
        "steps": [
            {
                "id": "draft",
                "prompt": "Draft a short note about ticket {{input.ticket_id}}.",
                "models": [_MODEL],
                "output": {"copy_ids": ["ticket_id"]},
            },
            {"id": "check", "depends_on": ["draft"], "prompt": "Check this note: {{steps.draft}}", "models": [_MODEL]},
        ],
    }
)


def config(name: str, **kw: Any) -> BudgetConfig:
    return BudgetConfig(
        limits=[LimitSpec(account="sim", tpm=TPM)],
        accounts={"openai": "sim"},
        window_s=60 * TIME_SCALE,
        actor_name=name,
        **kw,
    )


def kill_for_good(name: str) -> None:
    actor = find_budget_actor(name)
    if actor is not None:
        ray.kill(actor, no_restart=True)


def status_of(name: str, redis: Any = None, namespace: str = "") -> LedgerStatus:
    if redis is not None:
        return budget_status(redis_url=redis.url, namespace=namespace)
    return budget_status(name=name)


class Batch:
    """One batch through the budget with a fault injected after `after` runs have ended."""

    def __init__(self, name: str, budget: BudgetConfig, fault: Callable[[], None], after: int = 12) -> None:
        self.name = name
        self.budget = budget
        self.fault = fault
        self.after = after
        self.outcomes: list[RunOutcome] = []
        self.faulted_at: float | None = None
        self.snapshots: list[LedgerStatus] = []

    def on_done(self, outcome: RunOutcome) -> None:
        self.outcomes.append(outcome)
        if len(self.outcomes) == self.after:
            self.faulted_at = time.monotonic()
            self.fault()

    def _sample(self, stop: threading.Event) -> None:
        """Free + leased within the limit and the ledger adding up, while the batch runs (from a thread:
        the driver's loop must not wait on an actor that may be restarting)."""
        while not stop.wait(0.3):
            actor = find_budget_actor(self.name)
            if actor is None:
                continue
            try:
                self.snapshots.append(ray.get(actor.status.remote(), timeout=2.0))
            except (ray.exceptions.RayError, TimeoutError):
                continue  # restarting, or its ledger (Redis) is away

    def run(self, sim: Any, out: Path) -> list[RunOutcome]:
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(stop,), daemon=True)
        sampler.start()
        try:
            run_batch(
                WORKFLOW,
                [{"ticket_id": f"T-{i:05d}", "id": f"r{i:03d}"} for i in range(RUNS)],
                options=RunOptions(deadline_s=DEADLINE_S, tenant="acme"),
                simulator=SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url),
                out=out,
                max_in_flight=12,
                budget=self.budget,
                on_done=self.on_done,
            )
        finally:
            stop.set()
            sampler.join(timeout=5)
        assert self.faulted_at is not None, "the fault was never injected"
        assert self.snapshots, "the ledger was never sampled during the batch"
        return self.outcomes


def check_invariants(batch: Batch, sim: Any, out: Path, status: LedgerStatus, *, spend_survived: bool) -> None:
    outcomes = batch.outcomes
    # Each run ends, typed, by its deadline + grace.
    assert len(outcomes) == RUNS
    for o in outcomes:
        assert o.delivered or isinstance(o.failure, FailureReason)
        assert o.latency_s <= DEADLINE_S + DEFAULT_GRACE_S + 0.05, (o.run_id, o.latency_s, o.detail)
    # The results file has each run exactly once.
    ids = [json.loads(line)["run_id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(o.run_id for o in outcomes) and len(set(ids)) == RUNS
    # The provider never rejected an attempt for the quota.
    assert sum(1 for r in sim.log_records() if r["status"] == 429) == 0
    # Every ledger adds up; free + leased never exceeds the limit.
    for snapshot in [*batch.snapshots, status]:
        for key, b in snapshot.buckets.items():
            assert b.unreconciled == pytest.approx(0.0, abs=1e-6 * max(1.0, b.granted)), (key, b)
            assert b.level + b.outstanding <= b.capacity + 1e-6, (key, b)
    assert status.buckets, "the ledger has no buckets"
    # Most runs still delivered: the fault cost time, not the batch.
    assert sum(o.delivered for o in outcomes) >= RUNS * 0.75, [o.detail for o in outcomes if not o.delivered][:5]
    cost = sum(o.cost_usd for o in outcomes)
    recorded = status.spend["acme"].usd if "acme" in status.spend else 0.0
    if spend_survived:
        # Tenants' spend is the outcomes' cost (one definition of an attempt's cost), exactly.
        assert recorded == pytest.approx(cost, rel=1e-9, abs=1e-12)
        assert status.spend["acme"].attempts == sum(len(o.attempts) for o in outcomes)
    else:
        # The ledger forgot what was recorded before the fault; it never records more than was spent.
        assert 0 < recorded <= cost * (1 + 1e-9)


def test_budget_actor_killed_and_restarted_by_ray_without_redis(simulator, tmp_path):
    sim = simulator("tpm", seed=11, time_scale=TIME_SCALE, tpm_limit=TPM)
    name = "bf-restart-mem"
    batch = Batch(name, config(name), lambda: ray.kill(find_budget_actor(name), no_restart=False))
    try:
        batch.run(sim, tmp_path / "results.jsonl")
        health = ray.get(find_budget_actor(name).health.remote())
        assert health["restarted"] and health["backend"] == "memory"
        check_invariants(batch, sim, tmp_path / "results.jsonl", status_of(name), spend_survived=False)
    finally:
        kill_for_good(name)


def test_budget_actor_killed_and_restarted_by_ray_with_redis(simulator, redis_server, tmp_path):
    redis = redis_server(password="bf-pw")
    sim = simulator("tpm", seed=12, time_scale=TIME_SCALE, tpm_limit=TPM)
    name = "bf-restart-redis"
    budget = config(name, redis_url=redis.url, namespace="restart")
    batch = Batch(name, budget, lambda: ray.kill(find_budget_actor(name), no_restart=False))
    try:
        batch.run(sim, tmp_path / "results.jsonl")
        health = ray.get(find_budget_actor(name).health.remote())
        assert health["restarted"] and health["backend"] == "redis" and "bf-pw" not in json.dumps(health)
        status = status_of(name, redis, "restart")
        check_invariants(batch, sim, tmp_path / "results.jsonl", status, spend_survived=True)
    finally:
        kill_for_good(name)


@pytest.mark.parametrize("with_redis", [False, True], ids=["memory", "redis"])
def test_budget_actor_killed_for_good_is_replaced(simulator, redis_server, tmp_path, with_redis):
    """`ray.kill(no_restart=True)`, as a lost node would: executors and admission find the actor dead and
    put a replacement under the same name (dry without Redis; from Redis's state with it), spending
    their leases meanwhile; no run waits its whole deadline for a budget that no longer exists."""
    redis = redis_server() if with_redis else None
    sim = simulator("tpm", seed=13, time_scale=TIME_SCALE, tpm_limit=TPM)
    name = f"bf-gone-{'redis' if with_redis else 'mem'}"
    budget = config(name, redis_url=redis.url, namespace="gone") if redis else config(name)
    first = []

    def kill() -> None:
        actor = find_budget_actor(name)
        first.append(ray.get(actor.health.remote())["pid"])
        ray.kill(actor, no_restart=True)

    batch = Batch(name, budget, kill)
    try:
        batch.run(sim, tmp_path / "results.jsonl")
        replacement = find_budget_actor(name)
        assert replacement is not None, "nobody replaced the dead budget actor"
        health = ray.get(replacement.health.remote())
        assert health["pid"] != first[0] and health["restarted"]
        # Runs after the kill were neither refused nor starved for long: they delivered.
        after = batch.outcomes[batch.after :]
        assert sum(o.delivered for o in after) >= len(after) * 0.75, [o.detail for o in after if not o.delivered][:5]
        status = status_of(name, redis, "gone")
        check_invariants(batch, sim, tmp_path / "results.jsonl", status, spend_survived=with_redis)
    finally:
        kill_for_good(name)


@pytest.mark.parametrize("keeps_data", [True, False], ids=["restarted", "restarted-empty"])
def test_redis_stopped_and_restarted(simulator, redis_server, tmp_path, keeps_data):
    """Redis goes away for ~1.5 s mid-batch and comes back, with its data (saved at shutdown) or empty.
    Meanwhile the actor serves a local, smaller budget; back on Redis, what was used during the outage
    is charged to Redis as a debit, and Redis's own ledger still adds up exactly. A Redis that came back
    empty opens its buckets dry: the provider's window still holds recent use."""
    redis = redis_server()
    sim = simulator("tpm", seed=14, time_scale=TIME_SCALE, tpm_limit=TPM)
    name = f"bf-redis-{'data' if keeps_data else 'empty'}"
    budget = config(name, redis_url=redis.url, namespace="outage", redis_fallback_fraction=0.5)

    def outage() -> None:
        if keeps_data:
            import redis as redis_client

            # Saves and exits in one step, as a server with persistence does when it stops.
            with contextlib.suppress(redis_client.exceptions.ConnectionError):
                redis_client.Redis.from_url(redis.url, socket_timeout=2).shutdown(save=True)
            redis.proc.wait(timeout=10)
        redis.stop()
        threading.Timer(1.5, redis.start).start()

    batch = Batch(name, budget, outage)
    try:
        batch.run(sim, tmp_path / "results.jsonl")
        time.sleep(max(0.0, (batch.faulted_at or 0) + 2.0 - time.monotonic()))  # Redis is surely back
        # One more exchange on Redis from the actor, so the resync has happened.
        ray.get(find_budget_actor(name).free_for_planning.remote())
        status = status_of(name, redis, "outage")
        assert status.buckets, "nothing written to Redis after it came back"
        if keeps_data:
            bucket = next(iter(status.buckets.values()))
            assert bucket.debited > 0, "what was used during the outage was never charged to Redis"
        check_invariants(batch, sim, tmp_path / "results.jsonl", status, spend_survived=keeps_data)
    finally:
        kill_for_good(name)
