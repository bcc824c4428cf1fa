"""The training recipe: verified shards -> the plan's checks on the driver (memory preflight, time
and cost estimate) -> the checks only the cluster can answer, where the workers run (GPUs,
packages) -> Ray Train TorchTrainer running DeepSpeed on every worker (pipelines/train_worker.py)
-> verified checkpoints -> an exported, registered model.

A re-run with the same run_name and storage_path resumes from the run's newest verified
checkpoint; so does a worker group that Ray Train restarts after a failure (FailureConfig). A
re-run of a finished run trains no further: it exports (and registers) the model again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console

from contract.errors import UserError
from contract.models import load_tokenizer
from contract.registry import TRAINING_FACTS
from pipelines import preflight, worker_checks
from pipelines.configs import PrepareConfig, TrainConfig
from pipelines.flops import RunEstimate, attention_length, estimate_run, flops_per_token
from pipelines.manifest import MANIFEST_NAME, VerifiedData, verified
from pipelines.plan import DataFacts, TrainPlan
from pipelines.prepare import prepare
from pipelines.presets import PRESETS
from pipelines.progress import TrainProgress
from pipelines.train_worker import train_loop

IN_MEMORY_BYTES = 512 * 1024**2
PLAN_FILE = "plan.json"
# The worker check's CPU claim: any at all keeps it off nodes that run no work (KubeRay's head has
# num-cpus 0), and a sliver cannot wait behind a stage that holds whole CPUs on a small machine.
CHECK_CPUS = 0.1
# Passed on to the workers so that DeepSpeed's JIT-compiled ops are built once and reused.
WORKER_ENV = ("TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE")


@dataclass
class TrainResult:
    metrics: dict
    checkpoint: str | None
    run_dir: Path


def train(config: TrainConfig, console: Console | None = None, data: VerifiedData | None = None) -> TrainResult:
    """Train on `config.data_dir`: prepared from `config.source` first if set, else as `data`
    hands it on verified from a stage before, else verified here."""
    console = console or Console()
    config = _absolute(config)
    tokenizer = load_tokenizer(config.tokenizer_path)
    if config.source:
        data = prepare(
            PrepareConfig(
                source=config.source,
                output_dir=config.data_dir,
                tokenizer=config.tokenizer_path,
                model=config.base_model,
                **config.prepare.model_dump(),
            ),
            console,
        ).data
    manifest = verified(data or config.data_dir, tokenizer).manifest
    rows, seq_len = _train_rows(manifest)
    if not manifest["splits"]["test"]["examples"]:
        raise UserError(f"{config.data_dir} has no held-out split to evaluate on: prepare it with test_size of 1 or more")
    total_steps = _total_steps(config, rows)

    shape = preflight.ModelShape.of(config.base_model, config.gguf_file, config.lora if config.method == "lora" else None)
    # The plan's own checks first, here: a plan that cannot fit is refused before anything is asked
    # of the cluster.
    if config.preflight:
        fits = preflight.check(config, shape, seq_len)
        console.print(f"[bold]Preflight[/] fits: {fits.describe()}")
    preset = PRESETS[config.preset] if config.preset else None
    peak_tflops = preset.peak_tflops if preset and config.use_gpu else None
    cost = _estimate(config, shape, manifest, total_steps, peak_tflops)
    console.print(cost.describe() if cost else f"No estimate: {_no_peak(config)}")
    _check_on_workers(config)

    run_uri = _run_uri(config)
    what = f"{shape.n_params / 1e6:.1f} M parameters" + (
        f", LoRA r={config.lora.r}: {shape.trainable / 1e6:.2f} M trainable" if config.method == "lora" else ""
    )
    console.print(
        f"[bold]Training[/] {config.base_model} ({what}) on {rows:,} rows, "
        f"{total_steps} steps, {config.num_workers} worker(s), ZeRO-{config.zero_stage}, {config.precision}; "
        f"checkpoints in {run_uri}"
    )

    plan = TrainPlan(
        total_steps=total_steps,
        micro_batches_per_epoch=rows // config.num_workers // config.micro_batch_size,
        run_uri=run_uri,
        n_params=shape.n_params,
        trainable_params=shape.trainable,
        peak_flops=peak_tflops * 1e12 if peak_tflops else None,
        estimate=cost,
        hyperparameters=config.model_dump(mode="json"),
        data=DataFacts(
            dir=str(config.data_dir),
            manifest_sha256=hashlib.sha256((Path(config.data_dir) / MANIFEST_NAME).read_bytes()).hexdigest(),
            source_fingerprint=manifest["source"]["fingerprint"],
            tokenizer_fingerprint=manifest["tokenizer"]["fingerprint"],
            train_rows=rows,
            packed=manifest["packed"],
        ),
    )
    run_dir = Path(config.output_dir) / config.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PLAN_FILE).write_text(plan.model_dump_json(indent=1))  # beside metrics.jsonl: what was planned
    # Only the training split is ever packed.
    columns = {
        "train": ["input_ids", "labels"] + (["position_ids"] if manifest["packed"] else []),
        "test": ["input_ids", "labels"],
    }
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False  # training has its own bar
    try:
        datasets = {split: _dataset(Path(config.data_dir) / split, columns[split]) for split in columns}
    finally:
        context.enable_progress_bars = bars
    storage_path = run_uri.rsplit("/", 1)[0]
    progress = TrainProgress(console, plan.total_steps)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "plan": plan.model_dump(mode="json"),
            "progress": progress.feed,
        },
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.num_to_keep),
            worker_runtime_env={"env_vars": {k: os.environ[k] for k in WORKER_ENV if k in os.environ}},
        ),
        datasets=datasets,
    )
    with progress:
        result = trainer.fit()
    metrics = result.return_value or {}
    checkpoint = result.checkpoint.path if result.checkpoint else None
    console.print(
        f"[bold green]Done[/] step {metrics.get('step')}: "
        + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    )
    for key in ("export_dir", "registered", "loss_curve"):
        if key in metrics:
            console.print(f"[bold]{key.replace('_', ' ').capitalize()}[/] {metrics[key]}")
    return TrainResult(metrics, checkpoint, run_dir)


def train_once(
    config: TrainConfig, prefix: str, data_fingerprint: str, console: Console, data: VerifiedData | None = None
) -> tuple[TrainConfig, Path]:
    """Train under a run name made from the data and the settings, unless that run has exported
    already; returns (the config as run, its export folder). The same inputs then reuse their
    run, and other inputs never resume someone else's checkpoints."""
    settings = json.dumps(config.model_dump(mode="json", exclude={"run_name"}), sort_keys=True)
    run_name = f"{prefix}-" + hashlib.sha256((data_fingerprint + settings).encode()).hexdigest()[:10]
    config = config.model_copy(update={"run_name": run_name})
    export_dir = Path(config.output_dir).absolute() / run_name / "export"
    if (export_dir / TRAINING_FACTS).exists():
        console.print(f"Reusing run {run_name}: it finished with the same data and settings ({export_dir})")
    else:
        train(config, console, data)
    return config, export_dir


def _dataset(folder: Path, columns: list[str]) -> ray.data.Dataset:
    """A split's shards as a Ray Dataset. A small split (dolly-15k's is ~45 MB) is read here and
    handed to Ray as blocks in the object store: each epoch then starts in ~0.1 s, where a new pass
    over a streamed read re-reads the files and, on a small machine, costs seconds per epoch.
    Large splits stream."""
    files = sorted(folder.glob("*.parquet"))
    if sum(f.stat().st_size for f in files) <= IN_MEMORY_BYTES:
        return ray.data.from_arrow(pq.read_table(folder, columns=columns))
    return ray.data.read_parquet(str(folder.absolute()), columns=columns)


def _train_rows(manifest: dict) -> tuple[int, int]:
    """(training rows, longest row in tokens) of prepared shards."""
    if manifest["packed"]:
        return manifest["packing"]["rows"], manifest["max_length"]["value"]
    return manifest["splits"]["train"]["examples"], manifest["splits"]["train"]["max_tokens"]


def _total_steps(config: TrainConfig, rows: int) -> int:
    rows_per_step = config.num_workers * config.micro_batch_size * config.grad_accum
    # Each worker reads an equal share and drops its last partial micro-batch.
    micro_per_epoch = rows // config.num_workers // config.micro_batch_size
    if config.max_steps:
        if micro_per_epoch == 0:
            raise UserError(
                f"the training split has {rows} rows, fewer than one micro-batch on every worker "
                f"(num_workers x micro_batch_size = {config.num_workers * config.micro_batch_size}): "
                "lower num_workers or micro_batch_size, or prepare more data"
            )
        return config.max_steps
    steps = config.epochs * micro_per_epoch // config.grad_accum
    if steps == 0:
        raise UserError(
            f"the training split has {rows} rows, fewer than one optimizer step needs (num_workers x "
            f"micro_batch_size x grad_accum = {rows_per_step}): lower them, or prepare more data"
        )
    return steps


def _absolute(config: TrainConfig) -> TrainConfig:
    """Local paths made absolute here: workers may run in another working directory (a Ray job's
    is a temporary copy of the working dir)."""

    def local(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).absolute())

    def folder(name: str | None) -> str | None:  # a Hub id or a random shape stays as it is
        return str(Path(name).absolute()) if name and Path(name).is_dir() else name

    uri = config.mlflow_tracking_uri
    return config.model_copy(
        update={
            "base_model": folder(config.base_model),
            "tokenizer": folder(config.tokenizer),
            "data_dir": config.data_dir.absolute(),
            "output_dir": config.output_dir.absolute(),
            "registry": config.registry.absolute(),
            "storage_path": local(config.storage_path),
            "resume_from": local(config.resume_from),
            "mlflow_tracking_uri": "file:" + local(uri.removeprefix("file:")) if uri.startswith("file:") else uri,
        }
    )


def _estimate(
    config: TrainConfig, shape: preflight.ModelShape, manifest: dict, total_steps: int, peak_tflops: float | None
) -> RunEstimate | None:
    """The run's training steps priced at `config.assumed_mfu` of the devices' peak; None without
    a peak. Tokens: steps x rows per step x the mean tokens of a training row (the manifest's)."""
    if not peak_tflops:
        return None
    train = manifest["splits"]["train"]
    per_row = manifest["packing"]["fill"] * manifest["max_length"]["value"] if manifest["packed"] else train["mean_tokens"]
    tokens = total_steps * config.num_workers * config.micro_batch_size * config.grad_accum * per_row
    per_token = flops_per_token(
        layers=shape.layers,
        hidden=shape.hidden,
        vocab=shape.vocab,
        n_params=shape.n_params,
        seq_len=_attention_length(Path(config.data_dir) / "train", manifest["packed"]),
        trainable=shape.trainable,
    )
    return estimate_run(per_token, tokens, config.preset.upper(), config.num_workers, peak_tflops, config.assumed_mfu)


def _attention_length(folder: Path, packed: bool) -> float:
    """`attention_length` over the training examples, from one integer column of the shards."""
    if packed:  # a packed row's examples attend within themselves only
        return attention_length(n for row in pq.read_table(folder, columns=["seq_lens"]).column(0).to_pylist() for n in row)
    return attention_length(pq.read_table(folder, columns=["n_tokens"]).column(0).to_pylist())


def _no_peak(config: TrainConfig) -> str:
    """Why a run has no estimate."""
    if config.use_gpu:
        return "no preset gives the GPUs' peak FLOP/s (set preset=a100, a10, v100 or h100)"
    return "the cpu preset has no peak FLOP/s" if config.preset == "cpu" else "CPU workers have no peak FLOP/s"


def _check_on_workers(config: TrainConfig) -> None:
    """Refuse, before the TorchTrainer starts, what only the cluster can answer: whether it has a
    GPU at all, and whether the workers' image has what the plan needs (`worker_checks`), asked in
    a Ray task placed as one training worker is: on a GPU when use_gpu, so on a node and image
    where the workers will run."""
    plan = dict(
        attn_implementation=config.attn_implementation,
        quantize=config.method == "lora" and bool(config.lora.quantize),
        use_gpu=config.use_gpu,
    )
    if not worker_checks.needed(**plan):
        return
    if not ray.is_initialized():
        ray.init()  # as Ray's own calls do on first use
    if config.use_gpu and not ray.cluster_resources().get("GPU"):
        setting = f"preset={config.preset}" if config.preset else "use_gpu=true"
        raise UserError(
            f"{setting} trains on GPUs, and this Ray cluster has none (its resources: "
            f"{int(ray.cluster_resources().get('CPU', 0))} CPUs, no GPU), so no worker could ever start: "
            "train on CPUs with preset=cpu, or submit to a GPU cluster with --address http://HEAD:8265"
        )
    task = ray.remote(worker_checks.check).options(
        num_cpus=min(CHECK_CPUS, config.cpus_per_worker), num_gpus=1 if config.use_gpu else 0, max_retries=0
    )
    problems, where = ray.get(task.remote(**plan))
    if problems:
        raise UserError(f"the training workers' image cannot run this plan (checked on {where}):\n- " + "\n- ".join(problems))


def _run_uri(config: TrainConfig) -> str:
    return f"{config.storage_path.rstrip('/')}/{config.run_name}"
