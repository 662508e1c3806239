"""Shared fixtures: one Ray cluster per session (starting Ray costs seconds), simulators per test."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Token auth as users have it since Ray 2.59; explicit so a stray ~/.ray token cannot change behaviour.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# A crashed earlier session can leave this behind; it would make ray.init(num_cpus=...) join a dead cluster.
os.environ.pop("RAY_ADDRESS", None)


def start_session_ray() -> None:
    """The session's one-node cluster (also restarted by modules that need a multi-node one)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    start_session_ray()
    yield
    ray.shutdown()


@pytest.fixture
def simulator() -> Iterator[Callable[..., Any]]:
    """Start simulators on free loopback ports: `simulator("clean", seed=1, time_scale=0.01, log_path=...)`.
    Every simulator started through this fixture is stopped when the test ends."""
    from engine.sim import SimServer, scenario

    with contextlib.ExitStack() as stack:
        def start(name: str = "clean", log_path: Any = None, **overrides: Any) -> Any:
            return stack.enter_context(SimServer.in_thread(scenario(name, **overrides), log_path=log_path))

        yield start
