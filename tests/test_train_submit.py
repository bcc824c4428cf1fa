"""`dolly submit train` against a real cluster started with `ray start --head` (with Ray's token
auth, as here): the job runs `dolly train`, its logs stream back, and its exit status is ours."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.jobs import auth_headers

pytestmark = pytest.mark.timeout(420)
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A real head node on ports no one else uses, with its own temp dir (so that it leaves no
    /tmp/ray/ray_current_cluster for others' `ray.init()` to trip on); stopped afterwards by
    signalling its own `ray start --block` (never `ray stop`, which stops every cluster here)."""
    ports = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="dr", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    names = ["port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"]
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}", "--num-cpus=8",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--min-worker-port=21000", "--max-worker-port=21999",
               *(f"--{name}={port}" for name, port in zip(names, ports))]
    # The cluster's nodes have the project installed: `dolly` is on their PATH, as in an activated venv.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{ports[1]}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{address}/api/version", headers=auth_headers()), timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline or head.poll() is not None:
                    raise RuntimeError("the Ray head did not come up")
                time.sleep(1)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def dolly_submit(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dolly"), "submit", "train", "--address", address, "--working-dir", str(REPO), *args],
                          capture_output=True, text=True, timeout=400, env={**os.environ, "COLUMNS": "300"})


def test_a_bad_setting_is_refused_before_anything_is_submitted(ray_head):
    result = dolly_submit(ray_head, "zero_stage=7")
    assert result.returncode == 2 and "setting 'zero_stage'" in " ".join(result.stderr.split())
    assert "submitted" not in result.stdout


def test_a_job_that_fails_on_the_cluster_returns_its_failure(ray_head, tmp_path, tokenizer_path):
    result = dolly_submit(ray_head, "base_model=pythia-14m-random", f"tokenizer={tokenizer_path}",
                          f"data_dir={tmp_path / 'no-such-data'}")
    assert "submitted" in result.stdout
    assert "prepare the data first" in result.stdout, "the job's own error streams back"
    assert result.returncode != 0


def test_training_runs_as_a_job_with_streamed_logs_and_exit_status(ray_head, tmp_path, train_data, tokenizer_path):
    """From a raw corpus: the job prepares the shards first, then trains on them."""
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({
        "base_model": "pythia-14m-random", "tokenizer": tokenizer_path, "source": str(train_data.parent / "slice.jsonl"),
        "data_dir": str(tmp_path / "data"), "max_length": 128, "test_size": 2,
        "num_workers": 2, "micro_batch_size": 2, "max_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
        "storage_path": str(tmp_path / "storage"), "output_dir": str(tmp_path / "out"), "register_as": None,
        "run_name": "job",
    }))
    result = dolly_submit(ray_head, "--config", str(config), "lr=1e-4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Manifest" in result.stdout and (tmp_path / "data" / "manifest.json").exists()
    assert "step 2:" in result.stdout and "SUCCEEDED" in result.stdout
    assert (tmp_path / "out" / "job" / "export" / "model.safetensors").exists()
