"""Where Ray work runs: an existing cluster if one is named, else an embedded local one.

An address says which Ray to use (`resolve_address`):

| address                  | kind        | what it is                                                          |
|--------------------------|-------------|---------------------------------------------------------------------|
| none, `local`            | `local`     | an embedded Ray started for this process (the default)              |
| `auto`                   | `auto`      | the `ray start` cluster this machine belongs to                     |
| `host:6379`              | `gcs`       | a cluster's GCS: from inside it (a Ray job's driver gets this)      |
| `ray://host:10001`       | `client`    | Ray Client, from outside a cluster (KubeRay head service, `client`) |
| `http(s)://host:8265`    | `dashboard` | the dashboard: the Jobs API only (`dolly submit`, cluster/jobs.py)  |

None falls back to $RAY_ADDRESS. A dashboard URL cannot become a driver's address: `ray.init`
talks to the GCS or a Ray Client server, and the client port is not derivable from the dashboard's
(10001 is only KubeRay's default). So it is refused with what to use instead, never guessed.

The embedded cluster advertises more logical CPUs than the machine has cores. Ray Data tasks and
Ray Train workers each hold CPUs while they run; on a 2-core laptop, a strict one-CPU-per-core
budget lets the trainer take every slot and wait forever for data that cannot be scheduled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ray

from contract import logs
from contract.errors import UserError

# Enough logical slots for a data pipeline and two training workers on 2 cores.
MIN_LOCAL_CPUS = 8
# `ray start` turns token auth on when this file exists; a client then has to send the token,
# which Ray only does in token mode.
AUTH_TOKEN = Path.home() / ".ray" / "auth_token"

# Where Ray's State API clients (`ray.util.state`) look first for the API server.
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"

AddressKind = Literal["local", "auto", "gcs", "client", "dashboard"]


@dataclass(frozen=True)
class RayAddress:
    kind: AddressKind
    address: str

    def for_ray_init(self) -> str:
        """The address to give `ray.init`; a UserError for a dashboard URL, saying what to use."""
        if self.kind != "dashboard":
            return self.address
        host = self.address.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        raise UserError(
            f"{self.address} is a Ray dashboard URL: it takes Ray jobs, not drivers. Either run this as a job "
            f"(`dolly submit train --address {self.address} ...`), or connect with Ray Client "
            f"(--address ray://{host}:10001 on KubeRay), or unset RAY_ADDRESS to use an embedded local Ray."
        )


def resolve_address(address: str | None = None) -> RayAddress:
    """Which Ray `address` (else $RAY_ADDRESS, else an embedded one) names; see the module doc."""
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address in ("local", "auto"):
        return RayAddress(address, address)
    scheme, sep, _ = address.partition("://")
    if not sep:
        return RayAddress("gcs", address)
    if scheme == "ray":
        return RayAddress("client", address)
    if scheme in ("http", "https"):
        return RayAddress("dashboard", address)
    raise UserError(f"Ray address {address!r} is not one of: local, auto, host:port, ray://host:10001, http://host:8265")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_auth_env() -> dict[str, str]:
    """The environment a client needs to join a token-auth cluster: token mode, when a token is at
    hand (from `ray start` on this machine, or $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH, e.g. read from
    a KubeRay cluster's Secret) and no mode was chosen."""
    has_token = AUTH_TOKEN.exists() or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if has_token and "RAY_AUTH_MODE" not in os.environ:
        return {"RAY_AUTH_MODE": "token"}
    return {}


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use Ray inside this block; leave Ray as it was found.

    address: see `resolve_address`. The embedded default never joins a stale `ray start` head: a
    dead one leaves /tmp/ray/ray_current_cluster behind, and a bare `ray.init()` would hang
    trying to join it.
    """
    if ray.is_initialized():
        yield
        return
    target = resolve_address(address)
    init_address = target.for_ray_init()  # a dashboard URL fails here, before anything starts
    # The workers' output stays in Ray's log files (on the head, session_latest/logs): forwarded,
    # every worker's library warnings would interleave with the screen. What a person reads of
    # them comes through Ray itself: training's progress (pipelines/progress.py), errors as exceptions.
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": False}
    state_api = {}
    if target.kind == "local":
        # The dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner queries once
        # a second; without it, a warning per second fills the screen while training runs. On a
        # free port: another Ray on this machine (a `ray start` head) may hold the default 8265.
        # Its URL goes to every process of this session, which would otherwise look for a Ray on
        # this machine and fail where there are several.
        port = free_port()
        state_api = {STATE_API_ENV: f"http://127.0.0.1:{port}"}
        kwargs.update(
            num_cpus=num_cpus or max(MIN_LOCAL_CPUS, 2 * (os.cpu_count() or 1)),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": state_api},
        )
    else:
        os.environ.update(client_auth_env())
    logs.reroute()  # Ray's loggers got console handlers at import; ray.init logs through them
    ray.init(address=init_address, **kwargs)
    logs.reroute()  # and ray.init adds more
    node = ray._private.worker._global_node  # no public accessor; None when joined through Ray Client
    where = node.get_logs_dir_path() if node else "session_latest/logs in the head node's Ray temp folder"
    logs.logger.info("Ray's own logs (workers, Serve replicas): %s", where)
    before = {name: os.environ.get(name) for name in state_api}
    os.environ.update(state_api)
    try:
        yield
    finally:
        with logs.off_screen():
            ray.shutdown()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
