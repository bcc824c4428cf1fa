"""Checkpoints and resume: a run survives a killed worker and ends exactly where it was told to,
from a verified checkpoint; a damaged checkpoint is skipped, never resumed from; a checkpoint
of two workers resumes on one; from remote storage, each node copies only what its ranks load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipelines import checkpoints
from pipelines.configs import TrainConfig
from pipelines.metrics import read_history
from pipelines.train import train

pytestmark = pytest.mark.timeout(400)


def resume_config(tmp_path, data_dir, tokenizer_path, **settings) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "base_model": "pythia-14m-random",
            "tokenizer": tokenizer_path,
            "data_dir": str(data_dir),
            "num_workers": 2,
            "micro_batch_size": 2,
            "precision": "fp32",
            "zero_stage": 2,
            "lr": 1e-3,
            "warmup_steps": 2,
            "max_steps": 16,
            "log_every": 4,
            "eval_every": 8,
            "checkpoint_every": 4,
            "num_to_keep": 2,
            "max_failures": 1,
            "storage_path": str(tmp_path / "storage"),
            "output_dir": str(tmp_path / "out"),
            "register_as": None,
            "run_name": "resumable",
            **settings,
        }
    )


def train_workers() -> list[psutil.Process]:
    """This test session's Ray Train worker processes (children of its own Ray cluster)."""
    return [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]


def kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list, deadline: float) -> None:
    """SIGKILL one training worker once a complete checkpoint is in storage. (Killed earlier, in
    the middle of an upload, the run would rightly start over: that checkpoint does not verify.)"""
    while time.monotonic() < deadline:
        stored = checkpoints.candidates(str(run_dir))
        complete = [s for s in stored if all(checkpoints.problem(s, world_size=2, rank=r) is None for r in (0, 1))]
        if complete and (workers := train_workers()):
            os.kill(workers[0].pid, signal.SIGKILL)
            killed.append((workers[0].pid, complete[0].step))
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, train_data, tokenizer_path):
    config = resume_config(tmp_path_factory.mktemp("killed"), train_data, tokenizer_path)
    killed: list[tuple[int, int]] = []
    killer = threading.Thread(
        target=kill_a_worker_after_first_checkpoint,
        args=(Path(config.storage_path) / config.run_name, killed, time.monotonic() + 300),
    )
    killer.start()
    try:
        result = train(config)
    finally:
        killer.join()
    return config, result, killed


def test_a_killed_worker_resumes_from_a_verified_checkpoint_and_ends_at_max_steps(killed_run):
    config, result, killed = killed_run
    assert killed, "no worker was killed: the run ended before its first checkpoint"
    [(_, complete_at_kill)] = killed
    [resume] = result.metrics["resumes"]
    assert resume["step"] >= complete_at_kill and resume["step"] % config.checkpoint_every == 0
    assert resume["step"] < config.max_steps
    assert result.metrics["step"] == config.max_steps and result.metrics["unverified_checkpoints"] == 0
    logged = [row["step"] for row in read_history(config.output_dir / config.run_name)]
    assert logged == list(range(config.log_every, config.max_steps + 1, config.log_every))


def test_only_the_newest_verified_checkpoints_are_kept(killed_run):
    config, result, _ = killed_run
    stored = checkpoints.candidates(str(Path(config.storage_path).absolute() / config.run_name))
    assert [s.step for s in stored] == [16, 12]
    assert all(checkpoints.problem(s, world_size=2, rank=r) is None for s in stored for r in (0, 1))


def test_a_truncated_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(killed_run, tmp_path):
    config, _, _ = killed_run
    storage = tmp_path / "storage"
    shutil.copytree(config.storage_path, storage)
    newest, older = checkpoints.candidates(str(storage / config.run_name))
    victim = max((p for p in Path(newest.path).rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert "has" in checkpoints.problem(newest, world_size=2, rank=0)

    rerun = config.model_copy(update={"storage_path": str(storage), "output_dir": tmp_path / "out", "max_steps": 18})
    result = train(rerun)
    assert result.metrics["resumes"][-1] == {"checkpoint": older.path, "step": 12, "workers": 2}
    assert result.metrics["step"] == 18


def test_two_workers_checkpoint_resumes_on_one_through_deepspeeds_universal_checkpoint(killed_run, tmp_path):
    """ZeRO partitions the optimizer state by worker: a re-run with another num_workers converts
    the checkpoint (ds_to_universal) and goes on from it, model and optimizer both."""
    config, before, _ = killed_run
    storage = tmp_path / "storage"
    shutil.copytree(config.storage_path, storage)
    newest, _ = checkpoints.candidates(str(storage / config.run_name))

    # As a URI, as remote storage is named: the new checkpoints upload in the background.
    uri = f"file://{storage}"
    rerun = config.model_copy(update={"storage_path": uri, "output_dir": tmp_path / "out", "num_workers": 1, "max_steps": 18})
    result = train(rerun)
    assert result.metrics["resumes"][-1] == {"checkpoint": newest.path, "step": 16, "workers": 2}
    assert result.metrics["step"] == 18
    [written, *_] = checkpoints.candidates(f"{uri}/{config.run_name}")
    assert written.step == 18 and checkpoints.problem(written, world_size=1, rank=0) is None
    # The weights came along: the loss goes on from where two workers left it (a fresh start is ~10.8).
    assert result.metrics["train_loss"] == pytest.approx(before.metrics["train_loss"], rel=0.1)
    assert result.metrics["eval_loss"] == pytest.approx(before.metrics["eval_loss"], rel=0.02)


def load_through_a_remote_filesystem(loop_config: dict) -> None:
    """A Ray Train worker: build the engine a run of `config` builds and load the checkpoint from
    a pyarrow filesystem that is not pyarrow's local one (to Ray and to checkpoints.py it is
    remote, as S3 is), noting each file opened on it."""
    import deepspeed
    import fsspec
    import pyarrow.fs as pafs
    import ray.train
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    from transformers.integrations import HfDeepSpeedConfig

    from contract.models import load_tokenizer
    from pipelines import train_worker
    from pipelines.deepspeed_config import deepspeed_config

    class Noting(pafs.FSSpecHandler):
        opened: list[str] = []

        def open_input_stream(self, path):
            self.opened.append(path)
            return super().open_input_stream(path)

        def open_input_file(self, path):
            self.opened.append(path)
            return super().open_input_file(path)

    config = TrainConfig.model_validate(loop_config["config"])
    universal = loop_config["universal"]
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False  # as train_loop does, and then:
    deepspeed.init_distributed(dist_backend="gloo")
    hf_ds_config = HfDeepSpeedConfig(deepspeed_config(config, universal=universal))
    engine, _ = train_worker._engine(config, hf_ds_config, load_tokenizer(config.tokenizer_path), config.max_steps)
    stored = checkpoints.Stored(loop_config["path"], pafs.PyFileSystem(Noting(fsspec.filesystem("file"))), step=-1)
    state = checkpoints.load(engine, stored, universal)
    seen = {"step": state["step"], "opened": Noting.opened}
    (Path(loop_config["out"]) / f"rank_{ray.train.get_context().get_world_rank()}.json").write_text(json.dumps(seen))


def load_on_workers(config: TrainConfig, stored: checkpoints.Stored, workers: int, node_tmp: Path, out: Path) -> list[dict]:
    """What each of `workers` ranks saw loading `stored` from remote storage, with `node_tmp` as
    their temp dir."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    TorchTrainer(
        load_through_a_remote_filesystem,
        train_loop_config={
            "config": config.model_copy(update={"num_workers": workers}).model_dump(mode="json"),
            "path": stored.path,
            "universal": workers != config.num_workers,
            "out": str(out),
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(
            name="remote-resume",
            storage_path=str(out / "ray"),
            worker_runtime_env={"env_vars": {"TMPDIR": str(node_tmp)}},
        ),
    ).fit()
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(workers)]


@pytest.mark.parametrize("workers", [2, 1], ids=["as-many-workers", "universal"])
def test_from_remote_storage_each_node_copies_only_what_its_ranks_load_and_deletes_it_after(killed_run, tmp_path, workers):
    """Resuming on as many workers, a rank reads only the files it wrote, yet loads rank 0's copy
    of the module too: the node's first worker (here rank 0 itself) read it for all. A conversion
    reads every file once. The node's temp dir is left empty."""
    config, _, _ = killed_run
    newest, *_ = checkpoints.candidates(str(Path(config.storage_path).absolute() / config.run_name))
    node_tmp = tmp_path / "node_tmp"
    node_tmp.mkdir()
    seen = load_on_workers(config, newest, workers, node_tmp, tmp_path)

    manifests = Path(newest.path) / checkpoints.MANIFESTS
    wrote = [set(json.loads((manifests / f"rank_{r}.json").read_text())["files"]) for r in range(config.num_workers)]
    opened = [
        [str(Path(p).relative_to(newest.path)) for p in rank["opened"] if not p.startswith(str(manifests))] for rank in seen
    ]
    assert all(len(names) == len(set(names)) for names in opened), "no file is read twice"
    assert [set(names) for names in opened] == (wrote if workers == config.num_workers else [set.union(*wrote)])
    assert [rank["step"] for rank in seen] == [newest.step] * workers  # the step is in rank 0's model states
    assert [p for p in node_tmp.rglob("*") if p.is_file()] == []
