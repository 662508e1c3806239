"""Budget config: limits from workflows, bucket resolution, charges at reservation and settlement, redaction."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tailrace.engine.loading import workflow_from_dict
from tailrace.policies.budget_config import BudgetConfig, LimitSpec, redact_url, reserve_amount, settled_amount


@dataclass
class Ask:
    input_tokens: int = 100
    max_output_tokens: int = 400
    cost_usd: float = 0.01


@dataclass
class Used:
    input_tokens: int = 90
    output_tokens: int = 50
    cost_usd: float = 0.002
    reported: bool = True
    cancelled: bool = False


WORKFLOW = workflow_from_dict(
    {
        "name": "w",
        "providers": {
            "oa": {"kind": "openai", "tpm": 6000, "rpm": 60},
            "an": {"kind": "anthropic", "input_tpm": 1000, "output_tpm": 500},
        },
        "steps": [
            {
                "id": "s",
                "prompt": "p",
                "models": [
                    {"provider": "oa", "model": "m1", "max_tokens": 10},
                    {"provider": "an", "model": "m2", "max_tokens": 10},
                ],
            }
        ],
    }
)


def test_limits_come_from_the_workflow_providers():
    config = BudgetConfig(window_s=6.0).for_workflow(WORKFLOW)
    keys = {b.key: b for b in config.buckets_for("oa", "m1")}
    assert set(keys) == {"tokens:oa:*", "requests:oa:*"}
    assert keys["tokens:oa:*"].rate_per_s == pytest.approx(1000.0)  # 6000 per 6 s window
    anth = {b.family for b in config.buckets_for("an", "m2")}
    assert anth == {"input_tokens", "output_tokens"}
    assert config.provider_kinds == {"oa": "openai", "an": "anthropic"}


def test_explicit_limits_win_and_model_limits_stack_with_account_limits():
    config = BudgetConfig(limits=[LimitSpec(account="oa", tpm=100), LimitSpec(account="oa", model="m1", rpm=5)])
    config = config.for_workflow(WORKFLOW)
    assert {b.key for b in config.buckets_for("oa", "m1")} == {"tokens:oa:*", "requests:oa:m1"}
    assert {b.key for b in config.buckets_for("oa", "other")} == {"tokens:oa:*"}
    assert config.bucket("tokens:oa:*").capacity == 100


def test_shared_account_for_two_provider_names():
    config = BudgetConfig(accounts={"oa": "sim", "an": "sim"}, limits=[LimitSpec(account="sim", tpm=1000)])
    assert [b.key for b in config.buckets_for("oa", "x")] == [b.key for b in config.buckets_for("an", "y")]


def test_reserve_and_settle_amounts_by_how_the_provider_counts_the_window():
    config = BudgetConfig(limits=[LimitSpec(account="a", tpm=10_000, rpm=10, input_tpm=10_000, output_tpm=10_000)])
    buckets = {b.family: b for b in config.buckets_for("a", "m")}
    ask, used = Ask(), Used()
    assert reserve_amount(buckets["tokens"], ask) == 500
    assert reserve_amount(buckets["requests"], ask) == 1
    # OpenAI and Anthropic correct the output reservation to what was produced (the default).
    assert settled_amount(buckets["tokens"], "usage", ask, used) == 140
    assert settled_amount(buckets["output_tokens"], "usage", ask, used) == 50
    assert BudgetConfig().charges_for(LimitSpec(account="a"), "openai") == "usage"
    # A provider that keeps max_tokens charged: only the prompt over-estimate comes back.
    assert settled_amount(buckets["tokens"], "admission", ask, used) == 490
    # Cancelled before usage was reported, with or without tokens received: the full reservation (the
    # provider may have produced more than arrived).
    for received in (0, 30):
        cancelled = Used(input_tokens=100, output_tokens=received, reported=False, cancelled=True)
        assert settled_amount(buckets["tokens"], "usage", ask, cancelled) == 500
    # Failed before any token: billed nothing, but the prompt still counted against the window.
    failed = Used(input_tokens=0, output_tokens=0, cost_usd=0.0, reported=False)
    assert settled_amount(buckets["tokens"], "usage", ask, failed) == 100
    assert settled_amount(buckets["input_tokens"], "usage", ask, failed) == 100
    assert settled_amount(buckets["requests"], "usage", ask, failed) == 1


def test_redis_url_is_secret_and_redacted():
    config = BudgetConfig(redis_url="rediss://user:hunter2@cache.example:6380/0?ssl_cert_reqs=none")
    assert "hunter2" not in repr(config) and "hunter2" not in str(config)
    assert "hunter2" not in config.model_dump_json()
    assert config.redacted_redis_url() == "rediss://user:***@cache.example:6380/0"
    assert redact_url("redis://:pw@h:1") == "redis://:***@h:1"
    assert redact_url("redis://h:1/2") == "redis://h:1/2"
    with pytest.raises(ValueError):
        BudgetConfig(redis_url="http://nope")
