"""Shared fixtures: one Ray cluster per session (starting Ray costs seconds), simulators per test."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Token auth as users have it since Ray 2.59; explicit so a stray ~/.ray token cannot change behaviour.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# A crashed earlier session can leave this behind; it would make ray.init(num_cpus=...) join a dead cluster.
os.environ.pop("RAY_ADDRESS", None)
# Ray's metrics agent exports every 10 s by default; the dashboard test reads the series it exported.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")


def start_session_ray() -> None:
    """The session's one-node cluster (also restarted by modules that need a multi-node one)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh cluster of our own, never one another process left in /tmp/ray.
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
        )


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
    from tailrace.engine.sim import SimServer, scenario

    with contextlib.ExitStack() as stack:

        def start(name: str = "clean", log_path: Any = None, **overrides: Any) -> Any:
            return stack.enter_context(SimServer.in_thread(scenario(name, **overrides), log_path=log_path))

        yield start


# ---- a real redis-server on a free loopback port (the budget ledger's shared store) -----------------


class RedisServer:
    """One redis-server process: `url` has the password (if any) and TLS settings; `stop`/`start` keep the
    port, so a test can take Redis away mid-run and bring it back."""

    def __init__(self, workdir: Any, password: str | None, tls: bool) -> None:
        import shutil
        import socket

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: the budget tests need a real Redis. Install it with "
                "`apt-get install -y redis-server` (.ci/run does this when it is missing).",
                pytrace=False,
            )
        self.binary = binary
        self.workdir = workdir
        self.password = password
        self.tls = tls
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cert = self._make_cert() if tls else None
        self.proc: Any = None

    def _make_cert(self) -> str:
        import shutil
        import subprocess

        if shutil.which("openssl") is None:
            pytest.fail("openssl is needed to make a certificate for the Redis TLS test", pytrace=False)
        cert, key = self.workdir / "redis.crt", self.workdir / "redis.key"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        return str(cert)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import subprocess
        import time

        args = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            key = str(self.workdir / "redis.key")
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.cert,
                "--tls-key-file",
                key,
                "--tls-ca-cert-file",
                self.cert,
                "--tls-auth-clients",
                "no",
            ]
        else:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1)
        for _ in range(200):
            try:
                client.ping()
                client.close()
                return self
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None:
                    pytest.fail("redis-server exited: " + self.proc.stderr.read().decode()[-1000:], pytrace=False)
                time.sleep(0.025)
        pytest.fail(f"redis-server did not answer on port {self.port}", pytrace=False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Any) -> Iterator[Callable[..., RedisServer]]:
    """Start real redis-servers on free loopback ports: `redis_server(password="pw", tls=False)`.
    Every server started through this fixture is stopped when the test ends."""
    servers: list[RedisServer] = []

    def start(password: str | None = None, tls: bool = False) -> RedisServer:
        workdir = tmp_path / f"redis{len(servers)}"
        workdir.mkdir()
        server = RedisServer(workdir, password, tls).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
async def start_sim(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Any]]:
    """`await start_sim("clean", log_path=None, **overrides)`; servers and the SDK clients the test module
    keeps in its `CLIENTS` list are closed when the test ends."""
    from tailrace.engine.sim import SimServer, scenario

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
