"""Typed configs of the batch pipelines. Every field is a documented lever with a default that
works; YAML files and `key=value` on the command line override them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract import runs
from contract.decoding import Decoding
from contract.records import DOLLY_CATEGORIES
from contract.registry import DEFAULT_ROOT
from pipelines.behaviour import BehaviourConfig
from pipelines.presets import PRESETS, PresetName
from pipelines.sources import DOLLY_HUB_ID

AttentionName = Literal["sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "eager"]
# Kernels that find a packed row's examples (from restarting position_ids) only in a one-row
# batch: in a batch of several rows they would let a row's examples attend to each other.
ONE_ROW_PACKING = ("flash_attention_2", "flash_attention_3")


# Adapters on every linear layer of attention and MLP (the QLoRA paper's finding: adapting only
# the attention projections, PEFT's default, falls short of full fine-tuning).
LORA_TARGETS = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
LORA_LR = 2e-4  # the usual LoRA learning rate: adapters start at zero and need larger steps


class LoraSettings(BaseModel):
    """`method=lora`: low-rank adapters (PEFT) on the base's linear layers; the base stays frozen,
    and only the rows of Dolly's new tokens are trained in the embeddings (PEFT's trainable tokens)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="rank of each adapter")
    alpha: int = Field(32, ge=1, description="adapter scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | None = Field(
        None,
        description="modules that get adapters (default, by architecture: "
        + "; ".join(f"{arch} {', '.join(names)}" for arch, names in LORA_TARGETS.items())
        + "; any other: PEFT's all-linear)",
    )
    merged_export: bool = Field(
        False, description="also export the adapter merged into its base, as a plain HF folder (export-merged/)"
    )
    quantize: Literal["4bit"] | None = Field(
        None,
        description="QLoRA: hold the frozen base in 4 bits (NF4, double quantization; bitsandbytes, on CPU too) and train the adapters on top",
    )


class PrepareSettings(BaseModel):
    """How a corpus becomes training rows: the recipe of `dolly data prepare`, and of `dolly train`
    when it prepares its `source` itself."""

    model_config = ConfigDict(extra="forbid")

    max_length: int | None = Field(
        None, ge=16, description="longest example in tokens (default: from the model/tokenizer config, else 1024)"
    )
    length_policy: Literal["drop", "truncate"] = Field(
        "drop", description="over-length examples: drop them (as Dolly does) or truncate the response"
    )
    categories: list[str] | None = Field(list(DOLLY_CATEGORIES), description="allowed categories; null accepts any")
    on_bad: Literal["skip", "fail"] = Field(
        "skip", description="a malformed record: skip it (listed in rejects.jsonl) or stop the run"
    )
    test_size: int = Field(
        200, ge=0, description="held-out examples (Dolly's training notebook: 200; its trainer's own default: 1000)"
    )
    seed: int = Field(42, description="seed of the train/test split and the training order")
    pack: bool = Field(False, description="pack several examples per training row (no attention or loss across them)")
    pack_window: int = Field(2048, ge=1, description="examples considered together when packing rows")
    block_rows: int = Field(2000, ge=1, description="records per Ray Data block: the unit of parallel work")
    cpus_per_task: float = Field(
        0.5, gt=0, description="logical CPUs each Ray Data task claims; fractional so data and training can share small machines"
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="most tokenization tasks at once (default: this machine's cores: more only thrash, as the tokenizer is multi-threaded)",
    )


class PrepareConfig(PrepareSettings):
    """`dolly data prepare`: corpus -> validated, tokenized, split Parquet shards + manifest."""

    source: str = Field(
        DOLLY_HUB_ID, description="Hub dataset id, local .jsonl/.json/.parquet file or folder, or s3:// / gs:// URI"
    )
    output_dir: Path = Field(runs.DATA, description="where shards, manifest, rejects and plots are written")
    tokenizer: str = Field("EleutherAI/pythia-2.8b", description="base model's tokenizer: Hub id or local folder")
    model: str | None = Field(None, description="model whose config gives max_length (default: the tokenizer's folder)")
    force: bool = Field(False, description="prepare again even if output_dir already holds the same preparation")


class TrainConfig(BaseModel):
    """`dolly train`: full fine-tuning with Ray Train + DeepSpeed ZeRO on prepared shards.

    `preset` fills in the settings this config leaves unset (see pipelines/presets.py); settings
    given explicitly always win.
    """

    model_config = ConfigDict(extra="forbid")

    # What to train on
    base_model: str = Field(
        "EleutherAI/pythia-2.8b",
        description="HF causal-LM folder or Hub id, or a random shape 'pythia-14m-random' ... 'pythia-12b-random'",
    )
    tokenizer: str | None = Field(
        None, description="tokenizer folder or Hub id (default: base_model's; required for random shapes)"
    )
    gguf_file: str | None = Field(None, description="GGUF file inside base_model's folder to load (de-quantised), e.g. SmolLM2's")
    data_dir: Path = Field(runs.DATA, description="shards and manifest written by `dolly data prepare`")
    source: str | None = Field(
        None,
        description="raw corpus to prepare into data_dir first (file, folder, Hub id or URI); null: train on data_dir as it is",
    )
    prepare: PrepareSettings = Field(
        default_factory=PrepareSettings,
        description="how source is prepared, as `dolly data prepare` does (e.g. prepare.pack=true)",
    )

    # Method
    method: Literal["full", "lora"] = Field(
        "full", description="full fine-tuning, or LoRA adapters on a frozen base (PEFT; settings under lora.)"
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA's settings, with method=lora")

    # Hardware and parallelism
    preset: PresetName | None = Field(
        None, description="hardware preset: device memory, peak FLOP/s and a recipe for unset settings"
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU)")
    use_gpu: bool = Field(False, description="one GPU per worker with NCCL; false: CPU workers with gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs each worker claims")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters"
    )
    offload_optimizer: bool = Field(False, description="keep optimizer state (and the update) in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(False, description="keep parameters in CPU memory between uses (ZeRO-3 only)")
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "fp32", description="training precision; bf16/fp16 keep fp32 master weights"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: far less memory, ~30% more compute"
    )
    attn_implementation: AttentionName = Field(
        "sdpa",
        description="transformers' attention kernel: sdpa (PyTorch's, any device), flash_attention_2/3 (GPU, bf16/fp16, pip install flash-attn), flex_attention or eager",
    )
    padding_free: bool = Field(
        False,
        description="train on each micro-batch flattened into one row of its examples: no pad is computed (with flash_attention_2/3, no masked block either)",
    )
    device_memory_gib: float | None = Field(
        None, gt=0, description="memory of one device for the preflight (default: the preset's, else host memory / workers)"
    )
    host_memory_gib: float | None = Field(
        None, gt=0, description="CPU memory of one node for the preflight (default: the preset's, else this machine's)"
    )
    preflight: bool = Field(True, description="refuse a plan whose estimated memory does not fit before any worker starts")
    assumed_mfu: float = Field(
        0.35,
        gt=0,
        le=1,
        description="model FLOPs utilisation the run's time and cost estimate assumes (of the preset's peak_tflops)",
    )

    # Optimisation
    micro_batch_size: int = Field(4, ge=1, description="rows per worker per forward pass")
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per optimizer step (its loss is the mean over all of their response tokens)"
    )
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this (0: no clipping)")
    lr: float = Field(
        5e-6, gt=0, description=f"peak learning rate of AdamW (Dolly's notebook: 5e-6; with method=lora the default is {LORA_LR})"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(50, ge=0, description="optimizer steps of linear warmup from 0 to lr")
    decay: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="schedule after warmup (Dolly's WarmupLR is 'constant')"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="lr at the end of a linear or cosine decay, as a fraction of lr")
    epochs: int = Field(2, ge=1, description="passes over the training split (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to train for; overrides epochs")
    seed: int = Field(42, description="seed of model init and data order")

    # Evaluation, logging, checkpoints
    eval_every: int = Field(50, ge=1, description="held-out loss every N optimizer steps (and at the end)")
    eval_batches: int | None = Field(
        None, ge=1, description="most held-out micro-batches per worker per evaluation (default: the whole test split)"
    )
    log_every: int = Field(10, ge=1, description="metrics every N optimizer steps")
    checkpoint_every: int = Field(200, ge=1, description="verified checkpoint every N optimizer steps (and at the end)")
    num_to_keep: int = Field(3, ge=1, description="most recent checkpoints kept in storage")
    max_failures: int = Field(
        3, ge=0, description="worker-group restarts from the latest verified checkpoint before the run fails"
    )
    resume_from: str | None = Field(
        None, description="checkpoint folder to start from (default: this run's latest verified checkpoint, if any)"
    )
    run_name: str = Field(
        "dolly", pattern=r"^[A-Za-z0-9._-]+$", description="the run's name: a re-run with the same name and storage resumes it"
    )
    storage_path: str = Field(str(runs.TRAIN), description="where checkpoints go: a folder (local, NFS, PVC) or s3:// URI")
    output_dir: Path = Field(
        runs.TRAIN,
        description="local folder for the run's logs, loss curve and export (shared across nodes on a cluster)",
    )
    mlflow: bool = Field(False, description="also log parameters, metrics, the loss curve and the model card to MLflow")
    mlflow_tracking_uri: str = Field(
        f"file:{runs.MLRUNS}", description="MLflow tracking URI: a local file store by default, or an MLflow server's URL"
    )

    # Export
    export_dtype: Literal["bf16", "fp16"] = Field("bf16", description="dtype of the exported safetensors")
    register_as: str | None = Field(
        "dolly", description="registry name the export is registered under (NAME@latest); null: do not register"
    )
    registry: Path = Field(DEFAULT_ROOT, description="model registry folder")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values):
        if isinstance(values, dict) and values.get("preset") in PRESETS:
            values = {**PRESETS[values["preset"]].settings, **values}
        if isinstance(values, dict) and values.get("method") == "lora":
            values = {"lr": LORA_LR, **values}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(
                f"offload_params needs zero_stage=3 (got zero_stage={self.zero_stage}): set zero_stage=3 or offload_params=false"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs ZeRO (zero_stage 1, 2 or 3): set zero_stage=2 or offload_optimizer=false")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision=fp16 needs GPUs (DeepSpeed's CPU backend has no fp16): use precision=bf16 or fp32 on CPU")
        flash = self.attn_implementation in ONE_ROW_PACKING
        if flash and not self.use_gpu:
            raise ValueError(f"attn_implementation={self.attn_implementation} needs GPUs (use_gpu=true): on CPU use sdpa")
        if flash and self.precision == "fp32":
            raise ValueError(
                f"attn_implementation={self.attn_implementation} runs in bf16 or fp16 only: set precision=bf16, or attn_implementation=sdpa"
            )
        if flash and self.micro_batch_size > 1 and not self.padding_free:
            raise ValueError(
                f"attn_implementation={self.attn_implementation} with micro_batch_size={self.micro_batch_size} would let the examples "
                "of a packed row attend to each other (flash-attention finds their boundaries only in a one-row batch): "
                "set padding_free=true (one row per micro-batch, and no pad computed), or micro_batch_size=1"
            )
        if self.method == "lora" and self.base_model.startswith("pythia-") and self.base_model.endswith("-random"):
            raise ValueError(
                f"method=lora adapts a base that others can load again, and {self.base_model!r} is random weights that exist "
                "only in this run: save the shape first (a folder) and use it as base_model, or use method=full"
            )
        if self.method == "lora" and self.lora.quantize and self.zero_stage == 3:
            raise ValueError(
                "lora.quantize=4bit with zero_stage=3 is not supported: ZeRO-3 would partition the packed 4-bit weights; "
                "use zero_stage=2 (the 4-bit base is a quarter of a 16-bit one on every worker)"
            )
        if self.method == "lora" and self.zero_stage == 3 and not self.use_gpu:
            raise ValueError(
                "method=lora with zero_stage=3 needs GPUs: PEFT gathers Dolly's new token rows under ZeRO-3 on CUDA only; "
                "on CPU use zero_stage=2 (LoRA's trainable state is small: ZeRO-3's parameter sharding saves little)"
            )
        if self.tokenizer is None and self.base_model.startswith("pythia-") and self.base_model.endswith("-random"):
            raise ValueError(
                f"base_model={self.base_model!r} is a random shape with no tokenizer of its own: set tokenizer (e.g. ../shared/tokenizer/pythia)"
            )
        return self

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.base_model


# The EleutherAI LM Evaluation Harness tasks of the dolly-v2 model card's table, in its order
# (pipelines.harness holds the card's scores of them).
DOLLY_V2_TASKS = ("openbookqa", "arc_easy", "winogrande", "hellaswag", "arc_challenge", "piqa", "boolq")


class EvalConfig(BaseModel):
    """`dolly eval`: held-out loss per category (against a base, if given), sample answers, and
    optionally the LM Evaluation Harness tasks of the dolly-v2 table."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "dolly@latest",
        description="model to evaluate: NAME@latest / NAME@N from the registry, an exported folder, a Hub id, pythia-<size>-random or smollm2-135m-instruct",
    )
    base: str | None = Field(
        None, description="model to compare with, e.g. the base it was tuned from (same kinds of reference); null: no comparison"
    )
    tokenizer: str | None = Field(
        None, description="tokenizer folder or Hub id for both models (default: each model's own; random shapes need one)"
    )
    base_gguf_file: str | None = Field(
        None, description="GGUF file inside the base's folder to load (de-quantised); then also set tokenizer"
    )
    data_dir: Path = Field(runs.DATA, description="shards and manifest written by `dolly data prepare`: the test split is scored")
    output_dir: Path = Field(runs.EVAL, description="reports go to <output_dir>/<model name>/")
    registry: Path = Field(DEFAULT_ROOT, description="model registry folder")
    batch_size: int = Field(8, ge=1, description="examples per forward pass (and per generation batch)")
    max_examples: int | None = Field(
        None,
        ge=1,
        description="score only this many test examples: a deterministic subset, round-robin over categories (default: all)",
    )
    samples_per_category: int = Field(1, ge=0, description="test prompts per category to generate answers for (0: none)")
    decoding: Decoding = Field(
        Decoding(), description="how the per-category samples are decoded (Dolly's sampling; temperature=0: greedy)"
    )
    seed: int = Field(
        42,
        description="seed of sampling, and of random-shape weights (training's default, so a random base starts where training did)",
    )
    harness: bool = Field(
        False, description="also run the LM Evaluation Harness (pip install lm_eval; its datasets come from the Hugging Face Hub)"
    )
    tasks: list[str] = Field(list(DOLLY_V2_TASKS), description="lm-eval tasks (default: the dolly-v2 table's seven, zero-shot)")
    harness_limit: int | None = Field(
        None, ge=1, description="most examples per harness task (default: all; a limit is for smoke runs only)"
    )
    harness_include_path: Path | None = Field(
        None, description="folder of extra lm-eval task YAML files (e.g. tasks over local data)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the model runs (auto: a GPU if there is one; bf16 there, fp16 on GPUs older than Ampere, fp32 on CPU)",
    )
    behaviour: BehaviourConfig = Field(
        default_factory=BehaviourConfig,
        description="answers to held-out instructions, scored for stop rate, repetition, ROUGE-L and length",
    )
    feedback: str | None = Field(
        None,
        description="feedback database (SQLAlchemy URL, as serving's feedback.url): also score the corrections held out "
        "there (`dolly feedback hold-out`), i.e. whether the model still makes the mistakes people flagged",
    )
