"""Where Ray work runs: an existing cluster if one is named, else an embedded local one.

The embedded cluster advertises more logical CPUs than the machine has cores. Ray Data tasks and
Ray Train workers each hold CPUs while they run; on a 2-core laptop, a strict one-CPU-per-core
budget lets the trainer take every slot and wait forever for data that cannot be scheduled.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import ray

# Enough logical slots for a data pipeline and two training workers on 2 cores.
MIN_LOCAL_CPUS = 8
# `ray start` turns token auth on when this file exists; a client then has to send the token,
# which Ray only does in token mode.
AUTH_TOKEN = Path.home() / ".ray" / "auth_token"


def client_auth_env() -> dict[str, str]:
    """The environment a client needs to join a cluster that `ray start` started on this machine."""
    if AUTH_TOKEN.exists() and "RAY_AUTH_MODE" not in os.environ:
        return {"RAY_AUTH_MODE": "token"}
    return {}


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use Ray inside this block; leave Ray as it was found.

    address: None uses RAY_ADDRESS if set, else starts an embedded local cluster (never a stale
    `ray start` head: a dead one leaves /tmp/ray/ray_current_cluster behind, and a bare
    `ray.init()` would hang trying to join it).
    """
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address == "local":
        kwargs.update(num_cpus=num_cpus or max(MIN_LOCAL_CPUS, 2 * (os.cpu_count() or 1)), include_dashboard=False)
    else:
        os.environ.update(client_auth_env())
    ray.init(address=address, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
