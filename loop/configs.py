"""Typed configs of the loop: `dolly up`, `dolly retrain` and the gate between a candidate and the
serving model. Every field is a documented lever with a default that works."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contract import runs
from contract.decoding import Decoding
from contract.environment import FEEDBACK_URL_ENV
from contract.registry import DEFAULT_ROOT
from contract.settings import merge
from pipelines.behaviour import ANSWER_BUDGET, BehaviourConfig
from pipelines.configs import LORA_LR, TrainConfig
from pipelines.presets import PRESETS, PresetName

_CPU_DEMO = PRESETS["cpu"].demo  # for the help text; the settings themselves are read from the preset


class UpBehaviourConfig(BehaviourConfig):
    """`dolly up`'s behavioural scoring, whose decoding the API then serves with: a small model's
    greedy answers loop without a frequency penalty, and end with one (bench/RESULTS.md)."""

    decoding: Decoding = Field(
        Decoding(max_tokens=ANSWER_BUDGET, frequency_penalty=0.3),
        description="how the answers are scored, and the API then serves by default (but its max_tokens, the scoring "
        "budget); frequency_penalty=0 is Dolly's decoding",
    )


class UpConfig(BaseModel):
    """`dolly up`: the whole loop on one machine or cluster, with defaults that finish on a laptop.

    Unset (null) settings follow the preset's `demo` (pipelines/presets.py): on `cpu` a few minutes
    of training at short lengths; on a GPU preset, Dolly's recipe (two epochs at the model's context).
    """

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(
        None,
        description="corpus (file, folder, URI or Hub id); default: $DOLLY_DATA, else the Hub's databricks-dolly-15k if reachable, else the built-in sample",
    )
    base_model: str = Field(
        "smollm2-135m-instruct", description="model to fine-tune (Dolly's real recipe: EleutherAI/pythia-2.8b with preset=a100)"
    )
    tokenizer: str | None = Field(
        None, description="tokenizer folder or Hub id (default: the base model's; random shapes need one)"
    )
    preset: PresetName = Field("cpu", description="hardware preset of the training workers")
    workdir: Path = Field(runs.UP, description="prepared data, runs, evaluations and the API key file")
    registry: Path = Field(DEFAULT_ROOT, description="model registry the tuned model is registered in")
    model_name: str = Field("dolly", pattern=r"^[A-Za-z0-9._-]+$", description="registry name, served as the API's model id")
    max_length: int | None = Field(
        None,
        ge=16,
        description=f"longest example in tokens (default: {_CPU_DEMO['prepare']['max_length']} on cpu, else the model's context)",
    )
    test_size: int = Field(200, ge=1, description="held-out examples (Dolly's notebook: 200)")
    max_steps: int | None = Field(
        None, ge=1, description=f"optimizer steps (default: {_CPU_DEMO['max_steps']} on cpu, else Dolly's two epochs)"
    )
    num_workers: int | None = Field(
        None, ge=1, description=f"training workers (default: {_CPU_DEMO['num_workers']} on cpu, else 2, one per GPU)"
    )
    pack: bool | None = Field(
        None,
        description=f"pack several examples per training row (default: {_CPU_DEMO['prepare']['pack']} on cpu, else false: Dolly's padded batches)",
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description=f"rows per worker per step (default: {_CPU_DEMO['micro_batch_size']} on cpu, else the preset's)"
    )
    method: Literal["full", "lora"] = Field(
        "full", description="full fine-tuning, or LoRA adapters on the frozen base (PEFT; their settings: train.lora.r=...)"
    )
    lr: float | None = Field(
        None,
        gt=0,
        description=f"peak learning rate (default: {_CPU_DEMO['lr']:g} on cpu, a short run; else Dolly's 5e-6; with method=lora {LORA_LR:g})",
    )
    train: dict = Field(default_factory=dict, description="any further `dolly train` setting, e.g. train.zero_stage=3")
    eval_examples: int | None = Field(
        64, ge=1, description="held-out examples whose loss is scored before and after (null: all of them)"
    )
    behaviour: UpBehaviourConfig = Field(
        default_factory=UpBehaviourConfig,
        description="answers to held-out instructions, scored before and after (stop rate, repetition, ROUGE-L, length), decoded as the API then serves",
    )
    serve_decoding: Literal["measured", "sampled"] = Field(
        "measured",
        description="the decoding the model carries and is served with: measured = whichever of its scored ones "
        "(greedy, sampled) ends the most held-out answers without looping; sampled = behaviour.decoding as it is "
        "(with behaviour.decoding.frequency_penalty=0: Dolly's own)",
    )
    host: str = Field("127.0.0.1", description="HTTP address of the API and the page (0.0.0.0 to reach them from other machines)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the API and the page")
    open_browser: bool = Field(True, description="open the chat page in a browser once it is up")

    @model_validator(mode="after")
    def _train_settings_valid(self) -> UpConfig:
        try:
            self.train_config(self.workdir / "data")
        except ValidationError as e:  # name the setting as the user writes it: train.<field>
            raise ValueError("; ".join(f"train.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
        return self

    def train_config(self, data_dir: Path, run_name: str = "up", test_size: int | None = None) -> TrainConfig:
        """What `dolly up` trains with: the preset's demo under what this config sets. The preparation
        settings travel along, so `dolly retrain` prepares again with them."""
        chosen = dict(
            method=self.method,
            num_workers=self.num_workers,
            max_steps=self.max_steps,
            micro_batch_size=self.micro_batch_size,
            lr=self.lr,
            prepare=dict(pack=self.pack, max_length=self.max_length, test_size=test_size or self.test_size),
        )
        demo = dict(PRESETS[self.preset].demo)
        if self.method == "lora":
            demo.pop("lr", None)  # the demo's rate suits full fine-tuning; adapters take LoRA's
        settings = merge(demo, _set(chosen))
        if not PRESETS[self.preset].settings["use_gpu"] and settings.get("num_workers") == 1:
            # One CPU worker gets every core as its torch threads (Ray gives a worker as many as it claims).
            settings["cpus_per_worker"] = float(os.cpu_count() or 1)
        settings.update(
            base_model=self.base_model,
            tokenizer=self.tokenizer,
            data_dir=data_dir,
            preset=self.preset,
            run_name=run_name,
            storage_path=str(self.workdir / "runs"),
            output_dir=self.workdir / "runs",
            registry=self.registry,
        )
        # `dolly up` registers the export itself, once, however often it is run.
        return TrainConfig.model_validate({**merge(settings, self.train), "register_as": None})


def _set(values: dict) -> dict:
    """`values` without the unset (None) ones, nested mappings too."""
    return {k: _set(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


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
    behaviour: bool = Field(
        True, description="also judge the greedy answers: stop rate, repetition and ROUGE-L may not regress beyond the margins"
    )
    max_stop_rate_drop: float = Field(
        0.05, ge=0, le=1, description="how far the candidate's stop rate may fall below the serving model's (0.05: 5 points)"
    )
    max_repetition_rise: float = Field(
        0.02, ge=0, le=1, description="how far the candidate's mean repetition (share of repeated 4-grams) may rise"
    )
    max_rouge_l_drop: float = Field(
        0.01, ge=0, le=1, description="how far the candidate's mean ROUGE-L against the references may fall"
    )


class RetrainConfig(BaseModel):
    """`dolly retrain`: train on the corpus plus new records, evaluate against the serving version,
    and promote (and hot-swap) only if the gate passes."""

    model_config = ConfigDict(extra="forbid")

    corpus: str = Field(..., description="the corpus the serving model was trained on: file, folder, URI or Hub id")
    new_records: list[Path] = Field(default_factory=list, description="files of new records (JSONL, JSON or Parquet) to add")
    feedback: str | None = Field(
        None,
        description=f"a feedback database (serving's feedback.url): its approved written answers are added too; "
        f"${FEEDBACK_URL_ENV} replaces it where set, as it does serving's",
    )
    train: TrainConfig = Field(
        ..., description="`dolly train` settings (base_model, tokenizer, steps...); data and registration are set by retrain"
    )
    serving: str = Field("dolly@latest", description="the version to beat: NAME@N or NAME@latest")
    gate: GateConfig = Field(default_factory=GateConfig, description="when the candidate is promoted")
    eval_examples: int | None = Field(None, ge=1, description="held-out examples both models' loss is scored on (null: all)")
    behaviour: BehaviourConfig = Field(
        default_factory=BehaviourConfig,
        description="answers both models give to held-out instructions (the gate judges the greedy ones)",
    )
    serve_config: Path | None = Field(
        None, description="YAML of the running app's serve settings (`dolly up` writes one): hot-swap it on promotion"
    )
    workdir: Path = Field(runs.RETRAIN, description="combined corpus, prepared data, runs and reports")

    @property
    def model_name(self) -> str:
        return self.serving.partition("@")[0]

    @property
    def feedback_url(self) -> str | None:
        """The feedback database read: the one serving writes to (a Secret's Postgres on KubeRay)."""
        return os.environ.get(FEEDBACK_URL_ENV) or self.feedback
