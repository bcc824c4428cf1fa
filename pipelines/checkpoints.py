"""Verified DeepSpeed checkpoints: written by every rank, checked before Ray Train records them,
and checked again before anything resumes from them.

A checkpoint folder in storage holds DeepSpeed's files (each rank writes its own partition) and
one manifest per rank, `ranks/rank_<r>.json`, listing that rank's files with size and sha256.
At save time each rank reads its files back once, streaming (the hash, and the zip directory
that ends every torch.save file, which a cut-short write lacks), never loading the tensors: under
ZeRO-3 that would cost each rank GBs of host memory per checkpoint. The checkpoint is reported
only if every rank succeeded. At resume time a checkpoint counts only if every rank's manifest is
there and every file matches it; anything else (an upload cut short, a truncated or altered
file) is skipped with a warning and the next older one is tried.

A checkpoint written by another number of workers is converted with DeepSpeed's universal
checkpointing (ds_to_universal) and loaded into the new partitioning.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
import zipfile
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from pipelines.manifest import file_sha256

log = logging.getLogger(__name__)

TAG = "state"  # DeepSpeed's tag: the sub-folder its files go in
MANIFESTS = "ranks"
CLIENT_STATE = "dolly"  # our training state, apart from the keys DeepSpeed adds to client_state
_NAME = re.compile(r"^checkpoint_(?P<step>\d{8})_(?P<stamp>\d+)$")


@dataclass(frozen=True)
class Stored:
    """A checkpoint folder in storage."""

    path: str  # path within `filesystem` (no scheme)
    filesystem: pafs.FileSystem
    step: int


def storage(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local folder or a URI such as s3://bucket/prefix."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def checkpoint_dir_name(step: int) -> str:
    """A name that sorts by step and never repeats: a run that resumes from an older checkpoint
    writes its own, instead of merging files into a stale folder of the same step."""
    stamp = _broadcast(time.time_ns())
    return f"checkpoint_{step:08d}_{stamp}"


def save(engine, step: int, client_state: dict) -> Path | None:
    """Every rank: write this rank's part of the checkpoint into a fresh local folder, read it
    back to prove it complete, and list it in the rank's manifest.

    Returns the folder to report if every rank succeeded, else None (after a warning): a
    checkpoint that one rank could not write or read back is never reported.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"ckpt{step}_rank{dist.get_rank()}_"))
    try:
        engine.save_checkpoint(str(folder), tag=TAG, client_state={CLIENT_STATE: client_state})
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if path.suffix == ".pt":
                zipfile.ZipFile(path).close()  # reads only the directory at the end: raises if cut short
            files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        (folder / MANIFESTS).mkdir()
        manifest = {"step": step, "world_size": dist.get_world_size(), "files": files}
        (folder / MANIFESTS / f"rank_{dist.get_rank()}.json").write_text(json.dumps(manifest, indent=1))
        ok = True
    except Exception as e:  # a failed save must not kill a run that can go on to the next one
        log.warning("rank %d could not write or read back checkpoint at step %d: %r", dist.get_rank(), step, e)
        ok = False
    if _all_ranks(ok):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    if dist.get_rank() == 0:
        log.warning("checkpoint at step %d failed verification on some rank: not reported; training goes on", step)
    return None


def upload_mode(run_uri: str):
    """Remote storage (s3://, gs://, any URI) is uploaded to in the background while training goes
    on; a local folder (disk, NFS, a PVC) is copied to before the next step."""
    from ray.train import CheckpointUploadMode

    return CheckpointUploadMode.ASYNC if "://" in run_uri else CheckpointUploadMode.SYNC


def candidates(run_uri: str) -> list[Stored]:
    """The run's checkpoint folders in storage, newest step first."""
    fs, root = storage(run_uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    found = [
        (int(m["step"]), int(m["stamp"]), info.path)
        for info in infos
        if info.type == pafs.FileType.Directory and (m := _NAME.match(info.base_name))
    ]
    return [Stored(path, fs, step) for step, _, path in sorted(found, reverse=True)]


def latest_verified(choices: list[Stored]) -> Stored | None:
    """Every rank: the newest checkpoint that passes `problem` on all ranks; the others are
    skipped with a warning naming what is wrong."""
    for stored in choices:
        issue = problem(stored, dist.get_world_size(), dist.get_rank())
        if _all_ranks(issue is None):
            return stored
        if dist.get_rank() == 0:
            log.warning("skipping checkpoint %s: %s", stored.path, issue or "a file failed verification on another rank")
    return None


def problem(stored: Stored, world_size: int, rank: int) -> str | None:
    """What is wrong with a stored checkpoint for a run of `world_size` ranks, or None.

    Every rank checks that all manifests (one per rank that wrote the checkpoint) and files are
    present at their recorded sizes; the hashing is shared out, each rank hashing the files of
    the writers r with r % world_size == rank.
    """
    fs = stored.filesystem
    manifests: list[dict] = []
    while not manifests or len(manifests) < manifests[0]["world_size"]:
        r = len(manifests)
        try:
            manifests.append(_manifest(stored, r))
        except (OSError, ValueError) as e:
            return f"manifest of rank {r} missing or unreadable ({e.__class__.__name__})"
    for r, manifest in enumerate(manifests):
        for name, expected in manifest["files"].items():
            info = fs.get_file_info(f"{stored.path}/{name}")
            if info.type != pafs.FileType.File:
                return f"rank {r}'s file {name} is missing"
            if info.size != expected["size"]:
                return f"rank {r}'s file {name} has {info.size} bytes, {expected['size']} were written"
            if r % world_size == rank and file_sha256(f"{stored.path}/{name}", fs) != expected["sha256"]:
                return f"rank {r}'s file {name} changed since it was written (sha256 differs)"
    return None


def sweep_untracked(run_uri: str) -> None:
    """Rank 0, after reporting a checkpoint: delete the run's checkpoint folders that Ray Train
    does not track and that are older than all it does. Those are uploads a failure cut off
    before Ray registered them (verified or not): Ray's num_to_keep never sees them, and they
    would pile up. Folders Ray tracks are Ray's to delete (its run snapshot must find them)."""
    from ray.train import get_all_reported_checkpoints

    tracked = {str(Path(c.checkpoint.path)) for c in get_all_reported_checkpoints()}
    stored = candidates(run_uri)
    oldest_tracked = min((s.step for s in stored if s.path in tracked), default=None)
    for s in stored:
        if oldest_tracked is not None and s.path not in tracked and s.step < oldest_tracked:
            log.warning("deleting checkpoint %s: left over from a failed attempt, older than every checkpoint kept", s.path)
            s.filesystem.delete_dir(s.path)


def writers(stored: Stored) -> int:
    """How many workers wrote a verified checkpoint."""
    return _manifest(stored, 0)["world_size"]


def _manifest(stored: Stored, rank: int) -> dict:
    with stored.filesystem.open_input_stream(f"{stored.path}/{MANIFESTS}/rank_{rank}.json") as f:
        return json.loads(f.read())


def load(engine, stored: Stored, universal: bool) -> dict:
    """Restore model, optimizer and schedule from a verified checkpoint; returns the client state.

    `universal`: the checkpoint was written by another number of workers, and `engine` was built
    to load a universal checkpoint (deepspeed_config(universal=True)): it is converted first.
    """
    from ray.train import Checkpoint

    with Checkpoint(path=stored.path, filesystem=stored.filesystem).as_directory() as folder:
        root = _universal(Path(folder), stored) if universal else folder
        _, client_state = engine.load_checkpoint(str(root), tag=TAG)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the verified checkpoint {stored.path}")
    return client_state[CLIENT_STATE]


def _universal(folder: Path, stored: Stored) -> Path:
    """The checkpoint in `folder` converted to DeepSpeed's universal format (per-parameter fp32
    weights and optimizer moments, free of any partitioning), in a folder of this node that the
    engine then loads from. Each node's first worker converts, into the node's temp dir; the
    others wait for it."""
    import ray.train
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root = Path(tempfile.gettempdir()) / "dolly-universal" / Path(stored.path).name
    error = None
    if ray.train.get_context().get_local_rank() == 0 and not (root / TAG).is_dir():
        shutil.rmtree(root, ignore_errors=True)
        try:
            ds_to_universal(
                Namespace(
                    input_folder=str(folder / TAG),
                    output_folder=str(root / TAG),  # ds_to_universal names it in root/latest_universal
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    # The universal info of Megatron-style models, which HF models lack: DeepSpeed infers it.
                    inject_missing_state=True,
                )
            )
        except Exception as e:  # every rank must hear of it, or the others would wait forever
            shutil.rmtree(root, ignore_errors=True)
            error = e
    if not _all_ranks(error is None):
        raise RuntimeError(
            f"could not convert checkpoint {stored.path} (written by {writers(stored)} workers) to DeepSpeed's "
            f"universal format ({error!r} on this node's first worker, else on another node's); "
            f"set num_workers={writers(stored)} to resume it as it is"
        ) from error
    return root


def _all_ranks(ok: bool) -> bool:
    flag = torch.tensor([int(ok)], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _broadcast(value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
