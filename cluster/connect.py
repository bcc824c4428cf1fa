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

import ray

# Enough logical slots for a data pipeline and two training workers on 2 cores.
MIN_LOCAL_CPUS = 8


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
    ray.init(address=address, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()
