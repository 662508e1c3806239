"""Executor pool sizing on fake time: grow at once under load, shrink only after a quiet spell."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tailrace.cluster.pool import Load, PoolConfig, Scaler, wanted_size
from tailrace.engine.clock import FakeClock

CONFIG = PoolConfig(min_executors=2, max_executors=6, target_in_flight=10, scale_down_after_s=5.0)


@pytest.mark.parametrize(
    ("steps", "waiting", "attempts", "want"),
    [
        (0, 0, 0, 2),  # never under the minimum
        (20, 0, 0, 2),  # 10 per executor: at the target, not over it
        (21, 0, 0, 3),
        (15, 10, 0, 3),  # dispatches waiting for an executor count as load
        (5, 0, 41, 5),  # hedges make attempts outnumber steps: attempts decide
        (500, 0, 0, 6),  # never over the maximum
    ],
)
def test_wanted_size(steps, waiting, attempts, want):
    assert wanted_size(Load(steps, waiting, attempts), CONFIG) == want


def test_scaler_grows_at_once_and_shrinks_after_the_quiet_spell():
    clock = FakeClock()
    scaler = Scaler(CONFIG, clock)
    assert scaler.decide(Load(55, 0, 0), current=2) == 6  # grow at once
    assert scaler.decide(Load(0, 0, 0), current=6) == 6  # idle: not yet
    clock.advance(4.9)
    assert scaler.decide(Load(0, 0, 0), current=6) == 6
    clock.advance(0.2)
    assert scaler.decide(Load(0, 0, 0), current=6) == 2  # idle for 5.1 s: shrink to the minimum


def test_a_burst_resets_the_quiet_spell():
    clock = FakeClock()
    scaler = Scaler(CONFIG, clock)
    assert scaler.decide(Load(0, 0, 0), current=4) == 4
    clock.advance(4.0)
    assert scaler.decide(Load(40, 0, 0), current=4) == 4  # busy again: the clock restarts
    clock.advance(4.0)
    assert scaler.decide(Load(0, 0, 0), current=4) == 4
    clock.advance(5.0)
    assert scaler.decide(Load(0, 0, 0), current=4) == 2


def test_pool_config_bounds_and_shape():
    with pytest.raises(ValidationError, match="min_executors"):
        PoolConfig(min_executors=3, max_executors=2)
    with pytest.raises(ValidationError):
        PoolConfig(min_executors=0)
    assert PoolConfig(executor_num_cpus=0, executor_resources={"tailrace_executor": 1}).shape() == {
        "tailrace_executor": 1
    }
    assert PoolConfig.fixed(3).min_executors == PoolConfig.fixed(3).max_executors == 3
