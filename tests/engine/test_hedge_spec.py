"""A step's `hedge` block: loaded from YAML/JSON like any spec field, unknown keys and bad values named."""

from __future__ import annotations

import pytest

from tailrace.engine.errors import SpecErrors
from tailrace.engine.loading import workflow_from_dict
from tailrace.engine.specs import HedgeConfig


def workflow(hedge: dict) -> dict:
    return {
        "name": "w",
        "steps": [
            {
                "id": "s",
                "prompt": "hi",
                "hedge": hedge,
                "models": [{"provider": "openai", "model": "m", "max_tokens": 10}],
            }
        ],
    }


def test_step_hedge_block_sets_only_what_it_names():
    step = workflow_from_dict(workflow({"ttft_quantile": 0.8, "max_concurrent": 2})).steps[0]
    assert step.hedge == HedgeConfig(ttft_quantile=0.8, max_concurrent=2)
    assert step.hedge.model_fields_set == {"ttft_quantile", "max_concurrent"}


@pytest.mark.parametrize(
    ("hedge", "field"),
    [
        ({"ttft_quantil": 0.8}, "ttft_quantil"),
        ({"ttft_quantile": 1.5}, "ttft_quantile"),
        ({"max_concurrent": 0}, "max_concurrent"),
    ],
)
def test_bad_hedge_block_names_the_field(hedge, field):
    with pytest.raises((SpecErrors, ValueError)) as info:
        workflow_from_dict(workflow(hedge))
    assert field in str(info.value)
