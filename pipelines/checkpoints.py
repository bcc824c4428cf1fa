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

A checkpoint in local storage (disk, NFS, a PVC) loads in place. From remote storage (s3://,
gs://, any pyarrow filesystem) each rank copies only what it loads, into the node's temp dir,
deleted again once loaded (pods have little ephemeral storage): resuming on as many workers as
wrote it, DeepSpeed's load_checkpoint (0.19.8) opens the rank's own files alone (its ZeRO shard,
under ZeRO-3 its model states too; other ranks' shards only with elastic_checkpoint, which is
never set), plus under ZeRO 0-2 the module copy rank 0 wrote (SHARED), copied once per node and
linked into each rank's folder. A 12b ZeRO-3 checkpoint of ~168 GB then costs each node its
ranks' share of it, once. Each rank loads from a folder of its own with nothing else in it, so a
DeepSpeed that read another rank's file fails in the tests instead of finding it by chance.
A conversion reads every file: each node's first worker copies all of it, converts, and drops the
copy, while the node's other workers wait. All these waits are on a gloo group of their own with
a timeout of hours (LONG_WAIT), not on the default group, whose timeout is meant for quick
collectives. Every node copies and converts for itself, into a folder named by its node rank:
a temp dir that nodes share is then safe too, though not shared in use.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
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
# Under ZeRO 0-2, the one copy of the module (and schedule, and client state) that rank 0 writes
# and every rank loads; under ZeRO-3 each rank writes and loads its own model states.
SHARED = f"{TAG}/mp_rank_00_model_states.pt"
# How long ranks wait for each other while a node copies or converts a checkpoint: a 12b ZeRO-3
# checkpoint is ~168 GB, far beyond what the default group's timeout (Ray Train's TorchConfig
# timeout_s, 30 min) is meant for.
LONG_WAIT = timedelta(hours=4)


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
    with _local(stored, universal) as root:
        _, client_state = engine.load_checkpoint(str(root), tag=TAG)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the verified checkpoint {stored.path}")
    return client_state[CLIENT_STATE]


@contextmanager
def _local(stored: Stored, universal: bool) -> Iterator[Path]:
    """A local folder with what this rank loads of `stored`: the stored folder itself if it is
    local and loads as it is, else a folder of the node's temp dir (a copy or the conversion),
    deleted once every rank has loaded."""
    remote = not isinstance(stored.filesystem, pafs.LocalFileSystem)
    if not (remote or universal):
        yield Path(stored.path)
        return
    import ray.train

    context = ray.train.get_context()
    first = context.get_local_rank() == 0  # the node's first worker
    node = Path(tempfile.gettempdir()) / f"dolly-resume.{context.get_experiment_name()}.node_{context.get_node_rank()}"
    waits = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    if first:
        shutil.rmtree(node, ignore_errors=True)  # what a killed attempt left
    if not universal:
        dist.barrier(group=waits)  # no rank copies into the node's folder before it is cleared
    root = node / "universal" if universal else node / f"rank_{dist.get_rank()}"
    error = None
    try:
        if not universal:
            _copy_own(stored, node, root, first)
        elif first:
            _convert(stored, node, root)
    except Exception as e:  # every rank must hear of it, or the others would wait for this one
        error = e
    if not _all_ranks(error is None, waits):
        if first:
            shutil.rmtree(node, ignore_errors=True)
        n = writers(stored)
        raise RuntimeError(
            f"could not convert checkpoint {stored.path} (written by {n} workers) to DeepSpeed's universal format "
            f"({error!r} on this node's first worker, else on another node's); set num_workers={n} to resume it as it is"
            if universal
            else f"could not copy checkpoint {stored.path} into {node} ({error!r} on this rank, else on another); "
            f"check the free space in {tempfile.gettempdir()} (on k8s, the pod's ephemeral storage) and access to the storage"
        ) from error
    yield root
    dist.barrier(group=waits)  # every rank has loaded
    if first:
        shutil.rmtree(node, ignore_errors=True)
    dist.destroy_process_group(waits)


def _copy_own(stored: Stored, node: Path, root: Path, first: bool) -> None:
    """Copy into `root` what this rank loads when as many ranks wrote the checkpoint: its own
    files, and under ZeRO 0-2 rank 0's copy of the module (SHARED), which the node's first
    worker copies into `node`/shared and every rank links to."""
    rank, rank_0 = dist.get_rank(), _manifest(stored, 0)
    shared = [SHARED] if SHARED in rank_0["files"] else []
    own = _manifest(stored, rank)["files"] if rank < rank_0["world_size"] else {}  # more ranks: only under ZeRO-0
    _copy(stored, [name for name in own if name not in shared], root)
    if first:
        _copy(stored, shared, node / "shared")
    for name in shared:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(node / "shared" / name)


def _convert(stored: Stored, node: Path, root: Path) -> None:
    """Convert the checkpoint to DeepSpeed's universal format (per-parameter fp32 weights and
    optimizer moments, free of any partitioning) into `root`, from a copy of all of it in `node`
    unless it is local."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    source = Path(stored.path)
    try:
        if not isinstance(stored.filesystem, pafs.LocalFileSystem):
            source = node / "copy"
            _copy(stored, sorted({name for r in range(writers(stored)) for name in _manifest(stored, r)["files"]}), source)
        ds_to_universal(
            Namespace(
                input_folder=str(source / TAG),
                output_folder=str(root / TAG),  # ds_to_universal names it in root/latest_universal
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                # The universal info of Megatron-style models, which HF models lack: DeepSpeed infers it.
                inject_missing_state=True,
            )
        )
    finally:
        shutil.rmtree(node / "copy", ignore_errors=True)  # converted, or failed: no longer needed


def _copy(stored: Stored, names: list[str], folder: Path) -> None:
    started = time.perf_counter()
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            f"{stored.path}/{name}",
            str(folder / name),
            source_filesystem=stored.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
    size = sum((folder / name).stat().st_size for name in names)
    log.info(
        "rank %d copied %d files (%.2f GB) of checkpoint %s into %s in %.0f s",
        dist.get_rank(),
        len(names),
        size / 1e9,
        stored.path,
        folder,
        time.perf_counter() - started,
    )


def _all_ranks(ok: bool, group: dist.ProcessGroup | None = None) -> bool:
    flag = torch.tensor([int(ok)], device=collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _broadcast(value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
