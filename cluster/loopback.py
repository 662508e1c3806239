"""A local Ray cluster that tailrace starts itself listens on the loopback interface only.

Ray's metrics agent serves Prometheus metrics without authentication (tenant, workflow and model names,
costs) on the node's IP, which for a cluster started by `ray.init()` is the machine's outward address
(bound to 0.0.0.0). The agent binds to 127.0.0.1 only when the node's IP is the loopback address, and
Ray picks the loopback address only where it does not support clusters (`ENABLE_RAY_CLUSTER` off, as on
macOS and Windows). So while tailrace starts its own single-node cluster, that switch is off: every
component of that cluster, metrics included, listens on 127.0.0.1, and no other machine can join it
(it is a local cluster). Joining an existing cluster (an address, `RAY_ADDRESS`, or a cluster `ray
start` left running on this machine) is never changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def local_cluster_on_loopback(address: str | None) -> Iterator[None]:
    """Around `ray.init(address=address, ...)`: when that call will start a new local cluster, it
    starts on 127.0.0.1; otherwise nothing changes."""
    from ray._private import ray_constants, services

    if services.canonicalize_bootstrap_address(address) is not None:  # joins a running cluster
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by services.get_node_ip_address while the node starts
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
