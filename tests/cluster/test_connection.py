"""How a driver settles Ray's token auth before Ray reads it (in subprocesses: it changes the process's
environment and Ray's cached config)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os; from tailrace.cluster.connection import settle_auth_mode; "
    "print(settle_auth_mode(new_cluster={new}), os.environ.get('RAY_AUTH_MODE'))"
)


def settle(tmp_path, new_cluster: bool, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    clean["HOME"] = str(tmp_path)  # no ~/.ray/auth_token unless the test writes one
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(new=new_cluster)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("new_cluster", "env", "token_file", "expected"),
    [
        (True, {}, False, "token token"),  # a new local cluster: Ray's default, without its warning
        (False, {}, False, "None None"),  # joining without a token: left to Ray (it will say what is wrong)
        (False, {}, True, "token token"),  # joining with ~/.ray/auth_token: as `ray start` decides
        (False, {"RAY_AUTH_TOKEN": "t0k3n-value"}, False, "token token"),
        (True, {"RAY_AUTH_MODE": "disabled"}, True, "disabled disabled"),  # an explicit choice stands
    ],
)
def test_token_auth_is_settled_as_ray_start_would(tmp_path, new_cluster, env, token_file, expected):
    if token_file:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("t0k3n-from-file\n")
    assert settle(tmp_path, new_cluster, **env) == expected
