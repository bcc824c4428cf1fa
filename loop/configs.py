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


def _flat(settings: dict, prefix: str = "") -> dict:
    """{'prepare': {'pack': True}} -> {'prepare.pack': True}: settings as the command line writes them."""
    flat = {}
    for key, value in settings.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


class UpBehaviourConfig(BehaviourConfig):
    """`dolly up`'s behavioural scoring, whose decoding the API then serves with: a small model's
    greedy answers loop without a frequency penalty, and a fifth of them on some seeds still do
    with one, unless a presence penalty joins it; sampled at Dolly's temperature 1 a third of them
    ramble to the budget, at 0.7 an eighth (bench/RESULTS.md)."""

    decoding: Decoding = Field(
        Decoding(max_tokens=ANSWER_BUDGET, temperature=0.7, frequency_penalty=0.3, presence_penalty=0.6),
        description="how the answers are scored, and the API then serves by default (but its max_tokens, the scoring "
        "budget); temperature=1 frequency_penalty=0 presence_penalty=0 is Dolly's decoding",
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
    train: dict = Field(
        default_factory=dict,
        description="`dolly train` settings over the preset's demo (on cpu: "
        + ", ".join(f"{k}={v}" for k, v in _flat(_CPU_DEMO).items())
        + f"; on a GPU preset Dolly's recipe), e.g. train.max_steps=60 train.method=lora (at lr {LORA_LR:g}) "
        "train.prepare.test_size=100",
    )
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
        "(with behaviour.decoding.frequency_penalty=0 behaviour.decoding.presence_penalty=0: Dolly's own)",
    )
    host: str = Field("127.0.0.1", description="HTTP address of the API and the page (0.0.0.0 to reach them from other machines)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the API and the page")
    open_browser: bool = Field(True, description="open the chat page in a browser once it is up")

    @model_validator(mode="after")
    def _train_settings_valid(self) -> UpConfig:
        owned = self._own_train_settings(self.workdir / "data", "up")
        if clash := sorted(set(self.train) & set(owned)):
            key, (_, own) = clash[0], owned[clash[0]]
            raise ValueError(f"train.{key} is set by `dolly up` from its own setting {own}: set {own}=... instead")
        try:
            self.train_config(self.workdir / "data")
        except ValidationError as e:  # name the setting as the user writes it: train.<field>
            raise ValueError("; ".join(f"train.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
        return self

    def train_config(self, data_dir: Path, run_name: str = "up", test_size: int | None = None) -> TrainConfig:
        """What `dolly up` trains with: `train` over the preset's demo (and `test_size`, the corpus's
        own, under both). The preparation settings travel along, so `dolly retrain` prepares again
        with them."""
        demo = merge(dict(PRESETS[self.preset].demo), {"prepare": {"test_size": test_size}} if test_size else {})
        if self.train.get("method") == "lora" and "lr" not in self.train:
            demo.pop("lr", None)  # the demo's rate suits full fine-tuning; adapters take LoRA's
        settings = merge(demo, self.train)
        if not PRESETS[self.preset].settings["use_gpu"] and settings.get("num_workers") == 1:
            # One CPU worker gets every core as its torch threads (Ray gives a worker as many as it claims).
            settings.setdefault("cpus_per_worker", float(os.cpu_count() or 1))
        own = {key: value for key, (value, _) in self._own_train_settings(data_dir, run_name).items()}
        return TrainConfig.model_validate(settings | own)

    def _own_train_settings(self, data_dir: Path, run_name: str) -> dict[str, tuple[object, str]]:
        """The `dolly train` settings `dolly up` sets itself, refused under `train.`: {key: (value,
        the setting of `dolly up` it comes from)}."""
        runs_dir = self.workdir / "runs"
        return dict(
            base_model=(self.base_model, "base_model"),
            tokenizer=(self.tokenizer, "tokenizer"),
            preset=(self.preset, "preset"),
            registry=(self.registry, "registry"),
            source=(None, "data"),  # dolly up prepares the corpus itself; training reads data_dir
            data_dir=(data_dir, "workdir"),
            run_name=(run_name, "workdir"),
            storage_path=(str(runs_dir), "workdir"),
            output_dir=(runs_dir, "workdir"),
            register_as=(None, "model_name"),  # dolly up registers the export itself, once, however often it is run
        )


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
