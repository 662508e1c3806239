"""User code on real executors: a validator and a schema model defined in a module outside the repository
(in a temporary directory) are applied where steps run; one the executors cannot load stops the batch
before its first run; a setup that cannot work stops a batch within one step's time."""

from __future__ import annotations

import importlib
import os
import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tailrace import BatchConfig, ConfigurationError, PoolConfig, register_validator, run_batch
from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import AttemptOutcome, FailureReason
from tailrace.engine.providers.base import AdapterSettings
from tailrace.engine.sim import Fault
from tailrace.engine.specs import RunOptions
from tailrace.engine.validation import unregister_validator

pytestmark = pytest.mark.usefixtures("ray_cluster")

USER_MODULE = '''
"""A user's checks, in their own module (not part of tailrace, not on the executors' path)."""
import os

from pydantic import BaseModel


class Triage(BaseModel):
    ticket_id: str
    priority: int


def ticket_ok(value, text, inputs):
    if inputs["ticket_id"].endswith("BAD"):
        return f"flagged by the user's check in process {os.getpid()}"
    return None


def has_priority(value, text, inputs):
    return None if isinstance(value.get("priority"), int) else "no priority"


def explode(value, text, inputs):
    raise KeyError("severity")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh module in a temporary directory, importable in this (the driver's) process only."""
    name = f"user_checks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


@pytest.fixture
def registered():
    names: list[str] = []

    def register(name, fn):
        register_validator(name, fn, replace=True)
        names.append(name)
        return name

    yield register
    for name in names:
        unregister_validator(name)


def endpoints(sim) -> SimulatorEndpoints:
    return SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url)


def workflow(validators: list[str], schema_model: str | None = None):
    output = {"kind": "json", "copy_ids": ["ticket_id"], "validators": validators}
    if schema_model is not None:
        output["schema_model"] = schema_model
    return workflow_from_dict(
        {
            "name": "user-code",
            "inputs": ["ticket_id"],
            "steps": [
                {
                    "id": "triage",
                    "prompt": "Triage ticket {{input.ticket_id}}.",
                    "models": [
                        {"provider": "openai", "model": "gpt-4o-mini", "max_tokens": 200},
                        {"provider": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 200},
                    ],
                    "output": output,
                }
            ],
        }
    )


def test_a_validator_and_a_schema_model_from_the_users_module_are_applied_on_executors(
    simulator, user_module, registered, tmp_path
):
    name = user_module.__name__
    spec = workflow([f"{name}:ticket_ok", registered("tr_has_priority", user_module.has_priority)], f"{name}:Triage")
    # The first answer misses a required property: the user's schema model must reject it.
    sim = simulator("clean", seed=1, time_scale=0.01, script={"gpt-4o-mini": [Fault.SCHEMA_MISS]})
    outcomes = []
    summary = run_batch(
        spec,
        [{"id": "good", "ticket_id": "T-1"}, {"id": "bad", "ticket_id": "T-2-BAD"}],
        options=RunOptions(deadline_s=20),
        config=BatchConfig(pool=PoolConfig.fixed(1), max_in_flight=1, user_modules=[user_module]),
        providers=endpoints(sim),
        on_done=outcomes.append,
    )
    assert summary.runs == 2
    good, bad = sorted(outcomes, key=lambda o: o.run_id != "good")
    assert good.delivered and good.outputs["triage"]["ticket_id"] == "T-1"
    first, *rest = good.attempts
    assert first.outcome == AttemptOutcome.INVALID and first.invalid_reason.startswith("schema: ")
    assert rest[-1].outcome == AttemptOutcome.VALID
    # The user's validator judged every answer of the flagged ticket, in another process: an executor.
    assert bad.failure == FailureReason.INVALID_OUTPUT
    reasons = {a.invalid_reason for a in bad.attempts if a.outcome == AttemptOutcome.INVALID}
    assert reasons and all(r.startswith(f"validator:{name}:ticket_ok: flagged by the user's check") for r in reasons)
    pids = {int(r.rsplit(" ", 1)[1]) for r in reasons}
    assert os.getpid() not in pids


def test_a_validator_registered_only_in_the_driver_stops_the_batch_before_its_first_run(
    simulator, user_module, registered, tmp_path
):
    spec = workflow([registered("tr_unshipped", user_module.has_priority)])
    sim = simulator("clean", seed=1, time_scale=0.01)
    out = tmp_path / "results.jsonl"
    with pytest.raises(ConfigurationError) as caught:
        run_batch(
            spec,
            [{"id": f"r{i}", "ticket_id": f"T-{i}"} for i in range(5)],
            out=out,
            config=BatchConfig(pool=PoolConfig.fixed(2)),
            providers=endpoints(sim),
        )
    message = str(caught.value)
    assert "steps[triage].output.validators[0]" in message and "'tr_unshipped'" in message
    assert f"No module named '{user_module.__name__}'" in message
    assert "executor-0 on node" in message and "executor-1 on node" in message
    assert "user_modules" in message  # what to do about it
    assert sim.log_records() == []  # not one request was sent
    assert not out.exists() or out.read_text() == ""


def test_a_refused_base_url_stops_the_batch_within_one_step_naming_the_endpoint(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    providers = {
        "openai": AdapterSettings(kind="openai", base_url=f"{url}/v1", api_key="k"),
        "anthropic": AdapterSettings(kind="anthropic", base_url=url, api_key="k"),
    }
    out = tmp_path / "results.jsonl"
    taken: list[float] = []  # when each record was taken by the batch

    def records():
        for i in range(200):
            taken.append(time.monotonic())
            yield {"id": f"r{i}", "ticket_id": f"T-{i}"}

    with pytest.raises(ConfigurationError) as caught:
        run_batch(
            workflow([]),
            records(),
            out=out,
            options=RunOptions(deadline_s=30),
            config=BatchConfig(pool=PoolConfig.fixed(1), max_in_flight=4),
            providers=providers,
        )
    stopped = time.monotonic()
    # It stopped at the first run that failed this way: the runs in flight then, not the other 190-odd.
    assert len(taken) <= 4 + 1, f"{len(taken)} records were started"
    assert stopped - taken[0] < 20, "the batch spent its runs' deadlines on a refused endpoint"
    message = str(caught.value)
    assert f"cannot connect to {url}/v1/chat/completions: connection refused" in message
    assert "configuration error" in message and "step 'triage'" in message
    assert out.read_text() == ""  # nothing recorded: running again after the fix runs everything


async def test_an_unreachable_attempt_is_a_configuration_error_and_costs_nothing():
    from tailrace import Engine, EngineConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    providers = {
        "openai": AdapterSettings(kind="openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="k"),
        "anthropic": AdapterSettings(kind="anthropic", base_url=f"http://127.0.0.1:{port}", api_key="k"),
    }
    spec = workflow([])
    async with Engine(EngineConfig(pool=PoolConfig.fixed(1)), workflows=[spec], providers=providers) as engine:
        outcome = await engine.run(spec, {"ticket_id": "T-1"}, deadline=10)
    assert outcome.failure == FailureReason.CONFIGURATION_ERROR
    assert outcome.attempts and all(a.error.endpoint for a in outcome.attempts)
    assert outcome.cost_usd == 0 and outcome.input_tokens == outcome.output_tokens == 0
    assert f"127.0.0.1:{port}" in outcome.detail


def test_a_rejected_key_stops_the_batch_after_a_few_requests(simulator, tmp_path):
    auth = {m: Fault.AUTH for m in ("gpt-4o-mini", "claude-haiku-4-5")}
    sim = simulator("clean", seed=1, time_scale=0.01, force_fault=auth)
    with pytest.raises(ConfigurationError) as caught:
        run_batch(
            workflow([]),
            [{"id": f"r{i}", "ticket_id": f"T-{i}"} for i in range(100)],
            config=BatchConfig(pool=PoolConfig.fixed(1), max_in_flight=4),
            providers=endpoints(sim),
        )
    assert "rejected its API key (HTTP 401)" in str(caught.value)
    # Runs in flight when the first one failed may have sent theirs; not every run of the batch.
    assert len(sim.log_records()) <= 4 * 4


def test_a_validator_that_raises_on_every_answer_stops_the_batch(simulator, user_module, tmp_path):
    sim = simulator("clean", seed=1, time_scale=0.01)
    with pytest.raises(ConfigurationError) as caught:
        run_batch(
            workflow([f"{user_module.__name__}:explode"], f"{user_module.__name__}:Triage"),
            [{"id": f"r{i}", "ticket_id": f"T-{i}"} for i in range(100)],
            config=BatchConfig(pool=PoolConfig.fixed(1), max_in_flight=2, user_modules=[user_module]),
            providers=endpoints(sim),
        )
    assert f"validator '{user_module.__name__}:explode' raised KeyError: 'severity'" in str(caught.value)
    assert len(sim.log_records()) <= 2 * 4


def test_user_modules_must_exist(tmp_path):
    with pytest.raises(ValueError, match=r"neither a package directory nor a \.py file"):
        BatchConfig(user_modules=[tmp_path / "absent.py"])
    assert BatchConfig(user_modules=[Path(__file__)]).user_modules == (str(Path(__file__).resolve()),)
