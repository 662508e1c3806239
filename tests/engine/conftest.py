"""Simulator servers in the test's own event loop, for the simulator's wire and server tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from engine.sim import SimServer, scenario

Start = Callable[..., Awaitable[SimServer]]


@pytest.fixture
async def start_sim(request: pytest.FixtureRequest) -> AsyncIterator[Start]:
    """`await start_sim("clean", log_path=None, **overrides)`; servers and the SDK clients the test module
    keeps in its `CLIENTS` list are closed when the test ends."""
    servers: list[SimServer] = []

    async def start(name: str = "clean", log_path: Path | None = None, **overrides: Any) -> SimServer:
        overrides.setdefault("time_scale", 0.01)
        server = SimServer(scenario(name, **overrides), log_path)
        await server.start()
        servers.append(server)
        return server

    yield start
    clients: list[Any] = getattr(request.module, "CLIENTS", [])
    for client in clients:
        await client.close()  # before the test's loop closes, or httpx2 complains at collection
    clients.clear()
    for server in servers:
        await server.stop()
