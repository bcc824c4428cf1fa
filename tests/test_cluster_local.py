"""`dolly cluster up|down|status`: a real multi-process Ray cluster that leaves nothing behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from cluster import local
from cluster.connect import client_auth_env
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def state_file(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "STATE_FILE", tmp_path / "cluster.json")


def test_up_starts_a_head_and_workers_that_ray_can_use_and_down_leaves_no_process(state_file):
    cluster = local.up(workers=1, cpus_per_node=2, port=free_port(), dashboard_port=free_port())
    try:
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import ray; ray.init(address='{cluster.address}', logging_level='ERROR');"
                "print(sum(n['Alive'] for n in ray.nodes()), int(ray.cluster_resources()['CPU']))",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **client_auth_env()},
        )
        assert probe.stdout.split() == ["2", "4"], probe.stderr[-2000:]
        state = local.status()
        assert state["up"] and state["nodes_running"] == 2
        with pytest.raises(Exception, match="already up"):
            local.up(workers=0, port=free_port(), dashboard_port=free_port())
    finally:
        local.down()
    assert not any(local._session_of(pid) in cluster.sessions for pid in local._pids()), "no process is left"
    assert local.status()["up"] is False


def test_a_stale_address_file_is_removed_and_a_live_one_kept(tmp_path):
    address_file = tmp_path / "ray_current_cluster"
    dead = free_port()
    address_file.write_text(f"127.0.0.1:{dead}")
    assert local.clear_stale_address(tmp_path) == f"127.0.0.1:{dead}"
    assert not address_file.exists()

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address_file.write_text(f"127.0.0.1:{listening.getsockname()[1]}")
        assert local.clear_stale_address(tmp_path) is None
        assert address_file.exists()


def test_down_without_a_cluster_says_so(state_file):
    assert local.down() is None
