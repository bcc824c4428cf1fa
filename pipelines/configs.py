"""Typed configs of the batch pipelines. Every field is a documented lever with a default that
works; YAML files and `key=value` on the command line override them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.presets import PRESETS
from pipelines.behaviour import BehaviourConfig
from pipelines.records import DOLLY_CATEGORIES
from pipelines.sources import DOLLY_HUB_ID


class PrepareConfig(BaseModel):
    """`dolly data prepare`: corpus -> validated, tokenized, split Parquet shards + manifest."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(DOLLY_HUB_ID, description="Hub dataset id, local .jsonl/.json/.parquet file or folder, or s3:// / gs:// URI")
    output_dir: Path = Field(Path("runs/data"), description="where shards, manifest, rejects and plots are written")
    tokenizer: str = Field("EleutherAI/pythia-2.8b", description="base model's tokenizer: Hub id or local folder")
    model: str | None = Field(None, description="model whose config gives max_length (default: the tokenizer's folder)")
    max_length: int | None = Field(None, ge=16, description="longest example in tokens (default: from the model/tokenizer config, else 1024)")
    length_policy: Literal["drop", "truncate"] = Field("drop", description="over-length examples: drop them (as Dolly does) or truncate the response")
    categories: list[str] | None = Field(list(DOLLY_CATEGORIES), description="allowed categories; null accepts any")
    on_bad: Literal["skip", "fail"] = Field("skip", description="a malformed record: skip it (listed in rejects.jsonl) or stop the run")
    test_size: int = Field(1000, ge=0, description="held-out examples (Dolly used 200 to 1000)")
    seed: int = Field(42, description="seed of the train/test split and the training order")
    pack: bool = Field(False, description="pack several examples per training row (no attention or loss across them)")
    pack_window: int = Field(2048, ge=1, description="examples considered together when packing rows")
    block_rows: int = Field(2000, ge=1, description="records per Ray Data block: the unit of parallel work")
    cpus_per_task: float = Field(0.5, gt=0, description="logical CPUs each Ray Data task claims; fractional so data and training can share small machines")
    concurrency: int | None = Field(None, ge=1, description="most tokenization tasks at once (default: this machine's cores: more only thrash, as the tokenizer is multi-threaded)")
    force: bool = Field(False, description="prepare again even if output_dir already holds the same preparation")


class TrainConfig(BaseModel):
    """`dolly train`: full fine-tuning with Ray Train + DeepSpeed ZeRO on prepared shards.

    `preset` fills in the settings this config leaves unset (see cluster/presets.py); settings
    given explicitly always win.
    """

    model_config = ConfigDict(extra="forbid")

    # What to train on
    base_model: str = Field("EleutherAI/pythia-2.8b", description="HF causal-LM folder or Hub id, or a random shape 'pythia-14m-random' ... 'pythia-12b-random'")
    tokenizer: str | None = Field(None, description="tokenizer folder or Hub id (default: base_model's; required for random shapes)")
    gguf_file: str | None = Field(None, description="GGUF file inside base_model's folder to load (de-quantised), e.g. SmolLM2's")
    data_dir: Path = Field(Path("runs/data"), description="shards and manifest written by `dolly data prepare`")
    source: str | None = Field(None, description="raw corpus to prepare into data_dir first (file, folder, Hub id or URI); null: train on data_dir as it is")
    max_length: int | None = Field(None, ge=16, description="when preparing from source: longest example in tokens (default: the model's context)")
    pack: bool = Field(False, description="when preparing from source: pack several examples per row")
    test_size: int = Field(200, ge=1, description="when preparing from source: held-out examples (Dolly's notebook: 200)")

    # Hardware and parallelism
    preset: Literal["a100", "a10", "v100", "h100", "cpu"] | None = Field(None, description="hardware preset: device memory, peak FLOP/s and a recipe for unset settings")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU)")
    use_gpu: bool = Field(False, description="one GPU per worker with NCCL; false: CPU workers with gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs each worker claims")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters")
    offload_optimizer: bool = Field(False, description="keep optimizer state (and the update) in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(False, description="keep parameters in CPU memory between uses (ZeRO-3 only)")
    precision: Literal["bf16", "fp16", "fp32"] = Field("fp32", description="training precision; bf16/fp16 keep fp32 master weights")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: far less memory, ~30% more compute")
    device_memory_gib: float | None = Field(None, gt=0, description="memory of one device for the preflight (default: the preset's, else host memory / workers)")
    host_memory_gib: float | None = Field(None, gt=0, description="CPU memory of one node for the preflight (default: the preset's, else this machine's)")
    preflight: bool = Field(True, description="refuse a plan whose estimated memory does not fit before any worker starts")

    # Optimisation
    micro_batch_size: int = Field(4, ge=1, description="rows per worker per forward pass")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this (0: no clipping)")
    lr: float = Field(5e-6, gt=0, description="peak learning rate of AdamW (Dolly's notebook: 5e-6)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(50, ge=0, description="optimizer steps of linear warmup from 0 to lr")
    decay: Literal["constant", "linear", "cosine"] = Field("cosine", description="schedule after warmup (Dolly's WarmupLR is 'constant')")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="lr at the end of a linear or cosine decay, as a fraction of lr")
    epochs: int = Field(2, ge=1, description="passes over the training split (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to train for; overrides epochs")
    seed: int = Field(42, description="seed of model init and data order")

    # Evaluation, logging, checkpoints
    eval_every: int = Field(50, ge=1, description="held-out loss every N optimizer steps (and at the end)")
    eval_batches: int | None = Field(None, ge=1, description="most held-out micro-batches per worker per evaluation (default: the whole test split)")
    log_every: int = Field(10, ge=1, description="metrics every N optimizer steps")
    checkpoint_every: int = Field(200, ge=1, description="verified checkpoint every N optimizer steps (and at the end)")
    num_to_keep: int = Field(3, ge=1, description="most recent checkpoints kept in storage")
    max_failures: int = Field(3, ge=0, description="worker-group restarts from the latest verified checkpoint before the run fails")
    resume_from: str | None = Field(None, description="checkpoint folder to start from (default: this run's latest verified checkpoint, if any)")
    run_name: str = Field("dolly", pattern=r"^[A-Za-z0-9._-]+$", description="the run's name: a re-run with the same name and storage resumes it")
    storage_path: str = Field("runs/train", description="where checkpoints go: a folder (local, NFS, PVC) or s3:// URI")
    output_dir: Path = Field(Path("runs/train"), description="local folder for the run's logs, loss curve and export (shared across nodes on a cluster)")
    mlflow: bool = Field(False, description="also log parameters, metrics, the loss curve and the model card to MLflow")
    mlflow_tracking_uri: str = Field("file:runs/mlruns", description="MLflow tracking URI: a local file store by default, or an MLflow server's URL")

    # Export
    export_dtype: Literal["bf16", "fp16"] = Field("bf16", description="dtype of the exported safetensors")
    register_as: str | None = Field("dolly", description="registry name the export is registered under (NAME@latest); null: do not register")
    registry: Path = Field(Path("runs/registry"), description="model registry folder")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values):
        if isinstance(values, dict) and values.get("preset") in PRESETS:
            return {**PRESETS[values["preset"]].settings, **values}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage=3 (got zero_stage={self.zero_stage}): set zero_stage=3 or offload_params=false")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs ZeRO (zero_stage 1, 2 or 3): set zero_stage=2 or offload_optimizer=false")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision=fp16 needs GPUs (DeepSpeed's CPU backend has no fp16): use precision=bf16 or fp32 on CPU")
        if self.tokenizer is None and self.base_model.startswith("pythia-") and self.base_model.endswith("-random"):
            raise ValueError(f"base_model={self.base_model!r} is a random shape with no tokenizer of its own: set tokenizer (e.g. ../shared/tokenizer/pythia)")
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.base_model


class UpBehaviourConfig(BehaviourConfig):
    """`dolly up`'s behavioural scoring, whose decoding the API then serves with: a small model's
    greedy answers loop without a frequency penalty, and end with one (bench/RESULTS.md)."""

    frequency_penalty: float = Field(0.3, ge=-2, le=2, description="OpenAI's frequency penalty the answers are scored with and the API serves with by default (0: Dolly's decoding)")


class UpConfig(BaseModel):
    """`dolly up`: the whole loop on one machine or cluster, with defaults that finish on a laptop.

    Unset (null) settings follow the preset: on `cpu` a bounded demo (a few minutes of training
    at short lengths); on a GPU preset, Dolly's recipe (two epochs at the model's context).
    """

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(None, description="corpus (file, folder, URI or Hub id); default: $DOLLY_DATA, else the Hub's databricks-dolly-15k if reachable, else the built-in sample")
    base_model: str = Field("smollm2-135m-instruct", description="model to fine-tune (Dolly's real recipe: EleutherAI/pythia-2.8b with preset=a100)")
    tokenizer: str | None = Field(None, description="tokenizer folder or Hub id (default: the base model's; random shapes need one)")
    preset: Literal["a100", "a10", "v100", "h100", "cpu"] = Field("cpu", description="hardware preset of the training workers")
    workdir: Path = Field(Path("runs/up"), description="prepared data, runs, evaluations and the API key file")
    registry: Path = Field(Path("runs/registry"), description="model registry the tuned model is registered in")
    model_name: str = Field("dolly", pattern=r"^[A-Za-z0-9._-]+$", description="registry name, served as the API's model id")
    max_length: int | None = Field(None, ge=16, description="longest example in tokens (default: 256 on cpu, else the model's context)")
    test_size: int = Field(200, ge=1, description="held-out examples (Dolly's notebook: 200)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (default: 30 on cpu, else Dolly's two epochs)")
    num_workers: int | None = Field(None, ge=1, description="training workers (default: 1 on cpu: on one machine's cores a second worker adds gradient traffic and start-up, not tokens/s; else 2, one per GPU)")
    pack: bool | None = Field(None, description="pack several examples per training row (default: true on cpu, 1.6x the tokens/s of padded rows; else false, Dolly's padded batches)")
    micro_batch_size: int | None = Field(None, ge=1, description="rows per worker per step (default: 2 on cpu, else the preset's)")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: 5e-5 on cpu, a short run; higher made the answers loop, bench/RESULTS.md; else Dolly's 5e-6)")
    train: dict = Field(default_factory=dict, description="any further `dolly train` setting, e.g. train.zero_stage=3")
    eval_examples: int | None = Field(64, ge=1, description="held-out examples whose loss is scored before and after (null: all of them)")
    behaviour: UpBehaviourConfig = Field(default_factory=UpBehaviourConfig, description="answers to held-out instructions, scored before and after (stop rate, repetition, ROUGE-L, length), decoded as the API then serves")
    host: str = Field("127.0.0.1", description="HTTP address of the API and the page (0.0.0.0 to reach them from other machines)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the API and the page")
    open_browser: bool = Field(True, description="open the chat page in a browser once it is up")

    @property
    def on_cpu(self) -> bool:
        return self.preset == "cpu"

    @property
    def packed(self) -> bool:
        return self.on_cpu if self.pack is None else self.pack

    @model_validator(mode="after")
    def _train_settings_valid(self) -> UpConfig:
        try:
            self.train_config(self.workdir / "data")
        except ValidationError as e:  # name the setting as the user writes it: train.<field>
            raise ValueError("; ".join(f"train.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
        return self

    def train_config(self, data_dir: Path, run_name: str = "up") -> TrainConfig:
        cpu = self.on_cpu
        num_workers = self.num_workers or (1 if cpu else 2)
        chosen = dict(base_model=self.base_model, tokenizer=self.tokenizer, data_dir=data_dir, preset=self.preset, num_workers=num_workers,
                      max_steps=self.max_steps or (30 if cpu else None), run_name=run_name, pack=self.packed,
                      storage_path=str(self.workdir / "runs"), output_dir=self.workdir / "runs", registry=self.registry,
                      micro_batch_size=self.micro_batch_size or (2 if cpu else None), lr=self.lr or (5e-5 if cpu else None),
                      # One CPU worker gets every core as its torch threads (Ray gives a worker as many as it claims).
                      cpus_per_worker=float(os.cpu_count() or 1) if cpu and num_workers == 1 else None,
                      warmup_steps=3 if cpu else None, eval_batches=4 if cpu else None, checkpoint_every=15 if cpu else None)
        chosen = {k: v for k, v in chosen.items() if v is not None}
        # `dolly up` registers the export itself, once, however often it is run.
        return TrainConfig.model_validate({**chosen, **self.train, "register_as": None})


class GateConfig(BaseModel):
    """When a retrained model may replace the serving one, on the same held-out split: it must be
    better on `metric` by more than the margin, and (with `behaviour`) its greedy answers must not
    regress beyond the margins below. A lower loss alone is not a better model: one that no longer
    ends its answers, or loops, reads worse."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["loss", "perplexity"] = Field("loss", description="held-out response-token metric; lower is better")
    category: str | None = Field(None, description="judge on one category (e.g. closed_qa) instead of all held-out examples")
    min_improvement: float = Field(0.0, ge=0, description="how much lower the candidate's metric must be")
    relative: bool = Field(False, description="min_improvement is a fraction of the serving model's value (0.02: 2% lower)")
    behaviour: bool = Field(True, description="also judge the greedy answers: stop rate, repetition and ROUGE-L may not regress beyond the margins")
    max_stop_rate_drop: float = Field(0.05, ge=0, le=1, description="how far the candidate's stop rate may fall below the serving model's (0.05: 5 points)")
    max_repetition_rise: float = Field(0.02, ge=0, le=1, description="how far the candidate's mean repetition (share of repeated 4-grams) may rise")
    max_rouge_l_drop: float = Field(0.01, ge=0, le=1, description="how far the candidate's mean ROUGE-L against the references may fall")


class RetrainConfig(BaseModel):
    """`dolly retrain`: train on the corpus plus new records, evaluate against the serving version,
    and promote (and hot-swap) only if the gate passes."""

    model_config = ConfigDict(extra="forbid")

    corpus: str = Field(..., description="the corpus the serving model was trained on: file, folder, URI or Hub id")
    new_records: list[Path] = Field(default_factory=list, description="files of new records (JSONL, JSON or Parquet) to add")
    train: TrainConfig = Field(..., description="`dolly train` settings (base_model, tokenizer, steps...); data and registration are set by retrain")
    serving: str = Field("dolly@latest", description="the version to beat: NAME@N or NAME@latest")
    gate: GateConfig = Field(default_factory=GateConfig, description="when the candidate is promoted")
    eval_examples: int | None = Field(None, ge=1, description="held-out examples both models' loss is scored on (null: all)")
    behaviour: BehaviourConfig = Field(default_factory=BehaviourConfig, description="answers both models give to held-out instructions (the gate judges the greedy ones)")
    serve_config: Path | None = Field(None, description="YAML of the running app's serve settings (`dolly up` writes one): hot-swap it on promotion")
    workdir: Path = Field(Path("runs/retrain"), description="combined corpus, prepared data, runs and reports")

    @property
    def model_name(self) -> str:
        return self.serving.partition("@")[0]
