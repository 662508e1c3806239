"""Cost caps split among steps starting together; daily spend allowances as rate-0 buckets."""

from __future__ import annotations

import pytest

from tailrace.engine.specs import StepSpec
from tailrace.policies.buckets import TokenBucket
from tailrace.policies.budget_config import BudgetConfig, TenantBudget, utc_day
from tailrace.policies.spend_limits import attempt_weight, split_cost


def step(model_usd: float, max_tokens: int = 100) -> StepSpec:
    return StepSpec(
        id="s",
        prompt="p",
        models=[
            {
                "provider": "openai",
                "model": "m",
                "max_tokens": max_tokens,
                "input_usd_per_mtok": model_usd,
                "output_usd_per_mtok": model_usd,
            }
        ],
    )


def test_parallel_steps_split_by_what_one_attempt_may_cost():
    shares = split_cost(0.03, {"cheap": attempt_weight(step(1.0)), "dear": attempt_weight(step(2.0))})
    assert shares == {"cheap": pytest.approx(0.01), "dear": pytest.approx(0.02)}
    assert sum(shares.values()) == pytest.approx(0.03)
    assert split_cost(0.03, {"alone": 1.0}) == {"alone": pytest.approx(0.03)}
    assert split_cost(0.0, {"a": 1.0, "b": 1.0}) == {"a": 0.0, "b": 0.0}


def test_daily_allowance_is_a_bucket_per_utc_day():
    config = BudgetConfig(tenants={"acme": TenantBudget(daily_usd=5.0)})
    day = utc_day(1_700_000_000.0)
    spec = config.spend_bucket("acme", day)
    assert spec.key == f"usd:acme:{day}" and spec.capacity == 5.0 and spec.rate_per_s == 0.0
    assert config.bucket(spec.key) == spec
    assert config.spend_bucket("nobody-limited", day) is None
    b = TokenBucket.full(spec.capacity, spec.rate_per_s, 0.0)
    assert b.take_exactly(4.0, 0.0)
    b.spend(4.0, 0.0)
    assert not b.take_exactly(1.5, 86_000.0)  # no refill, however long we wait
    assert utc_day(1_700_000_000.0 + 86_400) != day  # the next day is a new, full bucket
