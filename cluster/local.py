"""A local multi-process Ray cluster for tests and demos: `dolly cluster up|down|status`.

Each node is `ray start --block` in its own session, so `down` stops exactly the processes this
cluster started (not every Ray on the machine, as `ray stop` would), and checks none are left.

A GPU cluster's decisions can be tried without a GPU: nodes declare GPUs they do not have
(`gpus_per_node`), and Ray places work and sets CUDA_VISIBLE_DEVICES as on real ones; a worker
node can be given folders of its own (`private`), as a node on another machine has its own disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.connect import AUTH_TOKEN, client_auth_env, free_port
from contract.errors import UserError

STATE_FILE = Path(os.environ.get("DOLLY_CLUSTER_STATE", Path.home() / ".cache" / "dolly-ray" / "cluster.json"))
DEFAULT_RAY_TEMP = Path(tempfile.gettempdir()) / "ray"


@dataclass
class LocalCluster:
    address: str  # host:port of the head's GCS, for ray.init(address=...)
    dashboard_url: str  # for the Jobs SDK and `dolly submit --address`
    temp_dir: str
    sessions: list[int]  # one process session per node: the head first
    log_dir: str

    @property
    def token_auth(self) -> bool:
        return AUTH_TOKEN.exists()  # `ray start` turns token auth on when this file exists


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _session_alive(session: int) -> bool:
    return any(_session_of(pid) == session for pid in _pids())


def _pids() -> list[int]:
    """Running processes. Zombies are left out: a node started by this very process stays one
    until reaped, though it has stopped."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(entry))
        except OSError:
            pass  # it exited while we looked
    return pids


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answered; with token auth on, unauthenticated calls get 401
    except OSError:
        return False


def clear_stale_address(temp_dir: Path = DEFAULT_RAY_TEMP) -> str | None:
    """Remove `ray_current_cluster` when the head it names is gone: a bare `ray.init()` would
    otherwise hang trying to join it. Returns the stale address it removed, if any."""
    address_file = Path(temp_dir) / "ray_current_cluster"
    if not address_file.exists():
        return None
    address = address_file.read_text().strip()
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=1).close()
        return None
    except (OSError, ValueError):
        address_file.unlink(missing_ok=True)
        return address


def read_state() -> LocalCluster | None:
    return LocalCluster(**json.loads(STATE_FILE.read_text())) if STATE_FILE.exists() else None


def up(
    workers: int = 1,
    cpus_per_node: int = 4,
    port: int = 6390,
    dashboard_port: int = 8265,
    timeout_s: float = 120,
    gpus_per_node: int | None = None,
) -> LocalCluster:
    """Start a head and `workers` worker nodes on this machine, each worker declaring
    `gpus_per_node` GPUs (None: those Ray detects); return once the dashboard answers."""
    existing = read_state()
    if existing and any(_session_alive(s) for s in existing.sessions):
        raise UserError(f"a cluster is already up at {existing.address} ({existing.dashboard_url}): `dolly cluster down` first")
    clear_stale_address()
    # A short path: Ray's unix sockets live under it and must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="dolly-ray-", dir="/tmp")
    log_dir = Path(temp_dir) / "logs-dolly"
    log_dir.mkdir()
    head = [
        _ray_bin(),
        "start",
        "--head",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        *_common(cpus_per_node),
        *_node_ports(head=True),
    ]
    cluster = LocalCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", temp_dir, [], str(log_dir))
    try:
        _start_node(cluster, head, timeout_s)
        for _ in range(workers):
            add_worker(cluster, cpus_per_node, timeout_s, gpus=gpus_per_node)
        _wait(lambda: _dashboard_up(cluster.dashboard_url), timeout_s, f"the dashboard at {cluster.dashboard_url}", log_dir)
        STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        STATE_FILE.write_text(json.dumps(asdict(cluster), indent=2))
    except BaseException:
        _stop_sessions(cluster.sessions)
        raise
    return cluster


def add_worker(
    cluster: LocalCluster, cpus_per_node: int = 4, timeout_s: float = 120, gpus: int | None = None, private: Sequence[Path] = ()
) -> int:
    """Start one more worker node in `cluster` (one that was lost, say); returns its session.
    `gpus`: GPUs it declares (None: those Ray detects). `private`: folders its processes see
    empty and of their own (a tmpfs over each, in a mount namespace of the node's: needs root),
    so that what other nodes write there never reaches it."""
    command = [_ray_bin(), "start", f"--address={cluster.address}", *_common(cpus_per_node)]
    command += [] if gpus is None else [f"--num-gpus={gpus}"]
    command += _node_ports()
    if private:
        mounts = " && ".join(f"mount -t tmpfs dolly-private {shlex.quote(str(p))}" for p in private)
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *command]
    return _start_node(cluster, command, timeout_s)


def lose_node(cluster: LocalCluster, session: int) -> None:
    """SIGKILL every process of one node, its raylet first among them, as a preempted spot
    node goes: nothing is told, nothing is cleaned up."""
    _signal_session(session, signal.SIGKILL)
    cluster.sessions.remove(session)
    _save_if_current(cluster)


def _common(cpus_per_node: int) -> list[str]:
    return ["--block", f"--num-cpus={cpus_per_node}", "--disable-usage-stats"]


def _start_node(cluster: LocalCluster, command: list[str], timeout_s: float) -> int:
    log_file = Path(cluster.log_dir) / f"node-{len(list(Path(cluster.log_dir).glob('node-*.log')))}.log"
    with open(log_file, "w") as log:
        # Worker nodes join the head as clients: with token auth on, they need token mode.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **client_auth_env()}
        )
    cluster.sessions.append(process.pid)
    # `ray start` prints this once its node has joined; the head must be up before workers start.
    _wait(
        lambda: "Ray runtime started" in log_file.read_text(),
        timeout_s,
        f"{log_file.stem} of {cluster.address}",
        Path(cluster.log_dir),
    )
    _save_if_current(cluster)
    return process.pid


def _save_if_current(cluster: LocalCluster) -> None:
    # `down` must know every node of the cluster that `up` recorded, added or lost since.
    if STATE_FILE.exists() and read_state().address == cluster.address:
        STATE_FILE.write_text(json.dumps(asdict(cluster), indent=2))


def _node_ports(head: bool = False) -> list[str]:
    """Free ports for a node's agents and servers. Ray's fixed defaults (52365 for the dashboard
    agent, 10001 for Ray Client...) collide with any other Ray on the machine, such as an embedded
    one: the job agent then never registers, and every job submission is refused."""
    names = [
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    ] + (["ray-client-server-port"] if head else [])
    return [f"--{name}={free_port()}" for name in names]


def _wait(condition, timeout_s: float, what: str, log_dir: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise UserError(f"{what} did not come up within {timeout_s:.0f} s; see the logs in {log_dir}")


def down() -> LocalCluster | None:
    """Stop the cluster `up` started, and every process it spawned. Returns it, or None if none was up."""
    cluster = read_state()
    if cluster is None:
        clear_stale_address()
        return None
    _stop_sessions(cluster.sessions)
    STATE_FILE.unlink(missing_ok=True)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    clear_stale_address()
    return cluster


def _stop_sessions(sessions: list[int], grace_s: float = 20) -> None:
    # Workers first, then the head: the head's GCS outliving its raylets avoids noisy reconnects.
    for session in reversed(sessions):
        _signal_session(session, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_session_alive(s) for s in sessions):
        time.sleep(0.5)
    for session in sessions:
        _signal_session(session, signal.SIGKILL)
    deadline = time.monotonic() + 5  # SIGKILL is not instant either
    while time.monotonic() < deadline and any(_session_alive(s) for s in sessions):
        time.sleep(0.2)
    leftover = [pid for pid in _pids() if _session_of(pid) in sessions]
    if leftover:
        raise UserError(f"processes {leftover} of the local cluster did not stop; kill them by hand")


def _signal_session(session: int, sig: int) -> None:
    for pid in _pids():
        if _session_of(pid) == session:
            with contextlib.suppress(OSError):  # gone already
                os.kill(pid, sig)


def status() -> dict:
    cluster = read_state()
    stale = clear_stale_address()
    if cluster is None:
        return {"up": False, "stale_address_removed": stale}
    alive = [s for s in cluster.sessions if _session_alive(s)]
    return {
        "up": bool(alive) and _dashboard_up(cluster.dashboard_url),
        "address": cluster.address,
        "dashboard": cluster.dashboard_url,
        "nodes_running": len(alive),
        "nodes": len(cluster.sessions),
        "token_auth": cluster.token_auth,
        "logs": cluster.log_dir,
        "stale_address_removed": stale,
    }
