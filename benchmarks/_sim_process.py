"""Run the simulator in its own process for benchmarks, so it does not share the GIL with a contender."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def simulator_process(scenario: str, seed: int, time_scale: float, log: str | None = None) -> Iterator[str]:
    """Yields the simulator's root URL (OpenAI base URL is ROOT/v1, Anthropic's is ROOT)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tailrace.cluster.cli",
        "sim",
        "--scenario",
        scenario,
        "--seed",
        str(seed),
        "--time-scale",
        str(time_scale),
        "--port",
        str(port),
    ]
    if log:
        cmd += ["--log", log]
    with serving(cmd, port) as root:
        yield root


@contextlib.contextmanager
def serving(cmd: list[str], port: int, tries: int = 400) -> Iterator[str]:
    """Start a simulator command that listens on `port`; yields its root URL once /health answers."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = f"http://127.0.0.1:{port}"
    try:
        for _ in range(tries):
            try:
                urllib.request.urlopen(root + "/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("simulator exited: " + proc.stderr.read().decode()[-2000:]) from None
                time.sleep(0.05)
        yield root
    finally:
        proc.terminate()
        proc.wait(timeout=10)
