"""Joining or starting a Ray cluster from a driver process: once per process, token auth settled first.

Since Ray 2.59 a cluster started by `ray start --head` or a local `ray.init()` uses token auth. Two
things go wrong for a user who has not set `RAY_AUTH_MODE`: a driver joining such a cluster retries
for ~20 s and fails with a bare `ConnectionError`, and every local `ray.init()` prints Ray's "token
authentication is enabled" warning. So before Ray reads it, `RAY_AUTH_MODE` is settled for this
process (and the workers it starts): `token` when a token is configured (`RAY_AUTH_TOKEN`,
`RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, as `ray start` itself decides), and for a new local
cluster `token` too (Ray's own default, without the warning). An explicit `RAY_AUTH_MODE` is never
changed.

`connect_existing` joins a running cluster only: it never starts a throwaway one (for read-only
commands such as `tailrace budget status`), and says what to do when there is none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tailrace.engine.errors import TailraceError

AUTH_MODE = "RAY_AUTH_MODE"


class ClusterUnavailableError(TailraceError):
    """No Ray cluster could be joined; the message says what to do."""


def auth_token_configured() -> bool:
    """A Ray auth token is available to this process (never read out or printed)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def settle_auth_mode(*, new_cluster: bool) -> str | None:
    """Set `RAY_AUTH_MODE` for this process when the user left it unset; the mode in force."""
    mode = os.environ.get(AUTH_MODE) or None
    if mode is None and (new_cluster or auth_token_configured()):
        os.environ[AUTH_MODE] = mode = "token"
    # Ray reads its config once, when first imported (maybe before the mode was set): refresh it, as
    # Ray's own `ray start` does after choosing a mode.
    from ray._raylet import Config

    Config.initialize("")
    return mode


def connect(
    address: str | None = None, *, num_cpus: int | None = None, runtime_env: Mapping[str, Any] | None = None
) -> None:
    """Start or join a Ray cluster, once per process: a new local cluster unless `address` (or
    `RAY_ADDRESS`) names one."""
    import ray

    if ray.is_initialized():
        return
    joining = address != "local" and bool(address or os.environ.get("RAY_ADDRESS"))
    settle_auth_mode(new_cluster=not joining)
    from tailrace.cluster.loopback import local_cluster_on_loopback

    try:
        with local_cluster_on_loopback(address):  # a cluster started here serves its metrics on 127.0.0.1 only
            ray.init(
                address=address,
                num_cpus=num_cpus,
                runtime_env=dict(runtime_env) if runtime_env else None,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
    except ConnectionError as exc:
        raise ClusterUnavailableError(_join_hint(address or os.environ.get("RAY_ADDRESS", ""), exc)) from None


def connect_existing(address: str | None = None) -> None:
    """Join a running cluster, never start one: `address`, else `RAY_ADDRESS`, else the cluster last
    started on this machine with `ray start`."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or _local_cluster_address()
    if not target:
        raise ClusterUnavailableError(
            "no Ray cluster is running on this machine: start one (`ray start --head`) or name one "
            "with --address HOST:6379 (or RAY_ADDRESS)"
        )
    settle_auth_mode(new_cluster=False)
    try:
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterUnavailableError(_join_hint(target, exc)) from None


def _local_cluster_address() -> str | None:
    """The address `ray start` recorded for this machine's latest cluster (no guessing from `ps`)."""
    from ray._private.utils import read_ray_address

    return read_ray_address(None) or None


def _join_hint(target: str, exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    hint = f"cannot join the Ray cluster at {target or 'the local machine'}: {first}"
    if not os.environ.get(AUTH_MODE) and not auth_token_configured():
        hint += (
            "; if the cluster uses token auth (Ray's default since 2.59), make its token available "
            "here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and set RAY_AUTH_MODE=token"
        )
    return hint
