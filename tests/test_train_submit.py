"""`dolly submit train` against a real cluster started with `ray start --head` (with Ray's token
auth, as here): the job runs `dolly train`, its logs stream back, and its exit status is ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import local
from cluster.connect import client_auth_env
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(420)
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real `ray start --head` (through `dolly cluster up`) on ports no one else uses, stopped
    afterwards with every process it started."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local, "STATE_FILE", tmp_path_factory.mktemp("cluster") / "cluster.json")
        # The cluster's nodes have the project installed: `dolly` is on their PATH, as in an activated venv.
        patch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        cluster = local.up(workers=0, cpus_per_node=8, port=free_port(), dashboard_port=free_port())
        try:
            yield cluster.dashboard_url
        finally:
            local.down()


def dolly_submit(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dolly"), "submit", "train", "--address", address, "--working-dir", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "COLUMNS": "300"},
    )


def test_a_bad_setting_is_refused_before_anything_is_submitted(ray_head):
    result = dolly_submit(ray_head, "zero_stage=7")
    assert result.returncode == 2 and "setting 'zero_stage'" in " ".join(result.stderr.split())
    assert "submitted" not in result.stdout


def test_a_job_that_fails_on_the_cluster_returns_its_failure(ray_head, tmp_path, tokenizer_path):
    result = dolly_submit(
        ray_head, "base_model=pythia-14m-random", f"tokenizer={tokenizer_path}", f"data_dir={tmp_path / 'no-such-data'}"
    )
    assert "submitted" in result.stdout
    assert "prepare the data first" in result.stdout, "the job's own error streams back"
    assert result.returncode != 0


def test_training_runs_as_a_job_with_streamed_logs_and_exit_status(ray_head, tmp_path, train_data, tokenizer_path):
    """From a raw corpus: the job prepares the shards first, then trains on them."""
    config = tmp_path / "train.yaml"
    config.write_text(
        json.dumps(
            {
                "base_model": "pythia-14m-random",
                "tokenizer": tokenizer_path,
                "source": str(train_data.parent / "slice.jsonl"),
                "data_dir": str(tmp_path / "data"),
                "prepare": {"max_length": 128, "test_size": 2},
                "num_workers": 2,
                "micro_batch_size": 2,
                "max_steps": 2,
                "log_every": 1,
                "eval_every": 2,
                "checkpoint_every": 2,
                "storage_path": str(tmp_path / "storage"),
                "output_dir": str(tmp_path / "out"),
                "register_as": None,
                "run_name": "job",
            }
        )
    )
    result = dolly_submit(ray_head, "--config", str(config), "lr=1e-4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Manifest" in result.stdout and (tmp_path / "data" / "manifest.json").exists()
    assert "step 2:" in result.stdout and "SUCCEEDED" in result.stdout
    assert (tmp_path / "out" / "job" / "export" / "model.safetensors").exists()


def test_plain_ray_job_submit_runs_dolly_train(ray_head, tmp_path, train_data, tokenizer_path):
    """Ray's own CLI, as an engineer would type it: token auth needs only RAY_AUTH_MODE=token,
    which makes Ray's client read the token from ~/.ray/auth_token."""
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        ray_head,
        "--working-dir",
        str(REPO),
        "--",
        "dolly",
        "train",
        "base_model=pythia-14m-random",
        f"tokenizer={tokenizer_path}",
        f"data_dir={train_data}",
        "num_workers=1",
        "micro_batch_size=2",
        "max_steps=1",
        "log_every=1",
        "warmup_steps=0",
        f"storage_path={tmp_path / 'storage'}",
        f"output_dir={tmp_path / 'out'}",
        "register_as=null",
        "run_name=plain",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=400, env={**os.environ, **client_auth_env(), "COLUMNS": "300"}
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "step 1:" in output and "succeeded" in output
    assert (tmp_path / "out" / "plain" / "export" / "model.safetensors").exists()


def test_a_driver_address_is_refused_with_the_dashboard_form_to_use():
    result = subprocess.run(
        [str(BIN / "dolly"), "submit", "train", "--address", "127.0.0.1:6379", "max_steps=1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert result.returncode == 1 and "http://HEAD:8265" in result.stderr and "submitted" not in result.stdout


def test_a_gated_retrain_runs_as_a_job_and_reports_its_decision(ray_head, tmp_path, train_data, tokenizer_path):
    from contract import registry
    from tests.conftest import export_tiny_model

    serving = export_tiny_model(tmp_path / "serving", tokenizer_path)
    registry.register(serving, "dolly", tmp_path / "registry")
    new = tmp_path / "new.jsonl"
    new.write_text((train_data.parent / "slice.jsonl").read_text().splitlines()[0] + "\n")
    train = {
        "base_model": "pythia-14m-random",
        "tokenizer": tokenizer_path,
        "prepare": {"max_length": 128, "test_size": 2},
        "num_workers": 1,
        "micro_batch_size": 2,
        "max_steps": 2,
        "warmup_steps": 0,
        "lr": 1e-3,
        "storage_path": str(tmp_path / "storage"),
        "output_dir": str(tmp_path / "out"),
        "registry": str(tmp_path / "registry"),
    }
    result = subprocess.run(
        [
            str(BIN / "dolly"),
            "submit",
            "retrain",
            "--address",
            ray_head,
            "--working-dir",
            str(REPO),
            f"corpus={train_data.parent / 'slice.jsonl'}",
            f"new_records=[{new}]",
            f"train={json.dumps(train)}",
            "serving=dolly@1",
            f"workdir={tmp_path / 'retrain'}",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "retrain" / "report.json").read_text())
    assert report["candidate"] == "dolly@2" and report["serving"] == "dolly@1"
    assert ("Promoted" if report["promoted"] else "Kept") in result.stdout, "the decision streams back"
