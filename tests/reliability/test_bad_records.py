"""One bad record fails alone, typed (`invalid_input`), with its line; a local error sends no request and
is never a provider error; every other run of the batch is written, each exactly once."""

from __future__ import annotations

import json

import pytest
from run_checks import assert_each_run_once, assert_each_run_typed_and_on_time

from tailrace.cluster.api import run_batch
from tailrace.cluster.providers import SimulatorEndpoints
from tailrace.engine.clock import SYSTEM_CLOCK
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.outcomes import ErrorKind
from tailrace.engine.providers.base import AdapterSettings, AttemptProgress, ProviderCall, build_adapter
from tailrace.engine.specs import RunOptions

pytestmark = pytest.mark.usefixtures("ray_cluster")

SPEC = workflow_from_dict(
    {
        "name": "records",
        "inputs": ["ticket", "meta"],
        "steps": [
            {
                "id": "read",
                "prompt": "Ticket {{input.ticket}} about {{input.meta.topic}}",
                "models": [
                    {"provider": "openai", "model": "gpt-4.1-mini", "max_tokens": 60},
                    {"provider": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 60},
                ],
            },
            {
                "id": "reply",
                "depends_on": ["read"],
                "side_effect": True,  # carries an Idempotency-Key header made from the run id
                "prompt": "Reply to {{steps.read}}",
                "models": [{"provider": "anthropic", "model": "claude-haiku-4-5", "max_tokens": 60}],
            },
        ],
    }
)

GOOD = {"ticket": "T-1", "meta": {"topic": "billing"}}
# (JSONL line, expected run id, expected failure or None, detail fragment)
LINES = [
    (json.dumps({"id": "ok-1", **GOOD}), "ok-1", None, None),
    (
        '{"id": "sur\\ud800", "ticket": "T-2", "meta": {"topic": "x"}}',
        "run-000002",
        "invalid_input",
        "inputs.jsonl:2: the run id",
    ),
    (
        '{"id": "val", "ticket": "T-\\udfff", "meta": {"topic": "x"}}',
        "val",
        "invalid_input",
        "inputs.jsonl:3: input field 'ticket'",
    ),
    (json.dumps({"id": "tmpl", "ticket": "T-4", "meta": "a string"}), "tmpl", "invalid_input", "{{input.meta.topic}}"),
    (json.dumps({"id": "ok-1", **GOOD}), "ok-1@line5", "invalid_input", "inputs.jsonl:5: run id 'ok-1' is used"),
    (
        json.dumps({"id": "miss", "ticket": "T-6"}),
        "miss",
        "invalid_input",
        "inputs.jsonl:6: missing input field(s): meta",
    ),
    ('{"id": "cut", "ticket": ', "run-000007", "invalid_input", "inputs.jsonl:7: not valid JSON"),
    ("[1, 2]", "run-000008", "invalid_input", "inputs.jsonl:8: expected a JSON object, got an array"),
    (json.dumps({"id": "nested", "ticket": "T", "meta": {"topic": "x", "n": [[[[[[]]]]]]}}), "nested", None, None),
    (
        '{"id": "deep", "ticket": "T", "meta": {"topic": "x", "n": ' + "[" * 70 + "]" * 70 + "}}",
        "deep",
        "invalid_input",
        "nested deeper than 64 levels",
    ),
    (json.dumps({"id": "ünï-ç", **GOOD}), "ünï-ç", None, None),  # a non-ASCII id: a valid header all the same
    (json.dumps({"id": "ok-2", **GOOD}), "ok-2", None, None),
    # A template path the input lacks is invalid_input (it was budget_exhausted), and nothing is sent.
    (json.dumps({"id": "lst", "ticket": "T", "meta": ["a", "b"]}), "lst", "invalid_input", "input.meta is a list of 2"),
    (json.dumps({"id": "num", "ticket": "T", "meta": {"topic": 7}}), "num", None, None),  # a number renders as JSON
]


def test_bad_records_fail_alone_typed_with_their_line_and_send_nothing(simulator, tmp_path):
    sim = simulator("clean", seed=5, time_scale=0.02)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_bytes(b"\n".join(line.encode("utf-8") for line, *_ in LINES) + b"\n\xff\xfe not utf-8\n")
    out = tmp_path / "results.jsonl"
    outcomes = []
    grace_s = 0.5
    summary = run_batch(
        SPEC,
        inputs,
        options=RunOptions(deadline_s=10),
        out=out,
        simulator=SimulatorEndpoints(sim.openai_base_url, sim.anthropic_base_url),
        grace_s=grace_s,
        on_done=outcomes.append,
    )
    expected = {run_id: (failure, fragment) for _, run_id, failure, fragment in LINES}
    expected["run-000015"] = ("invalid_input", "inputs.jsonl:15: not UTF-8 text")
    assert summary.runs == len(expected)
    assert_each_run_typed_and_on_time(outcomes, grace_s)
    lines = {line["run_id"]: line for line in assert_each_run_once(out, len(expected))}
    assert set(lines) == set(expected)
    for run_id, (failure, fragment) in expected.items():
        line = lines[run_id]
        assert line["failure"] == failure, (run_id, line["detail"])
        if fragment is not None:
            assert fragment in line["detail"], (run_id, line["detail"])
        if failure is not None:
            assert line["attempts"] == [], f"{run_id}: a request was sent"  # nothing was sent for it
            assert "budget" not in line["detail"]
    delivered = [r for r, (failure, _) in expected.items() if failure is None]
    assert summary.delivered == len(delivered)
    # The provider saw only the delivered runs' requests (two steps each): no retried local errors.
    assert len(sim.log_records()) == 2 * len(delivered)
    assert {r["idempotency_key"] for r in sim.log_records() if r["idempotency_key"]} >= {
        "tailrace-%C3%BCn%C3%AF-%C3%A7-reply"
    }


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_text_that_cannot_be_encoded_is_a_local_error_sent_nowhere(start_sim, kind):
    sim = await start_sim("clean")
    url = sim.openai_base_url if kind == "openai" else sim.anthropic_base_url
    adapter = build_adapter(AdapterSettings(kind, url, api_key="sk-test"), SYSTEM_CLOCK)
    model = "gpt-4.1-mini" if kind == "openai" else "claude-haiku-4-5"
    try:
        for call in (
            ProviderCall("p", kind, model, "hello \ud800", 20),
            ProviderCall("p", kind, model, "hello", 20, headers={"Idempotency-Key": "k-\u00fc\u00ef"}),
        ):
            raw = await adapter.attempt(call, AttemptProgress(SYSTEM_CLOCK.monotonic()))
            if raw.error is None:  # this SDK carries the header after all
                assert call.headers
                continue
            assert raw.error.kind == ErrorKind.LOCAL_ERROR and not raw.error.retryable, raw.error
    finally:
        await adapter.aclose()
    assert len(sim.log_records()) <= 1  # at most the header call; never the surrogate one
    assert all("\ud800" not in json.dumps(r) for r in sim.log_records())
