"""How good a tuned model is, next to its base: held-out loss per Dolly category, how it answers
held-out instructions, sample answers, and the EleutherAI LM Evaluation Harness tasks of the
dolly-v2 model card.

- `heldout_loss`: token-weighted cross-entropy on the response tokens of the prepared test split
  (the tokens training puts loss on), overall and per category, from shards whose tokenizer is
  checked against the model's first.
- `compare` / `plot_comparison`: base vs tuned, as a table and a PNG.
- `heldout_behaviour`: answers to held-out instructions, greedy or sampled, scored for stop rate,
  repetition, ROUGE-L and length (`pipelines/behaviour.py`); `score_model` does loss and
  behaviour together, `show_scores` shows one model or two side by side.
- `sample_generations`: answers generated with Dolly's sampling defaults, with serving's decoder.
- `lm_eval_harness`: lm-eval's tasks scored with our model, printed beside the published table.

torch, transformers and matplotlib are imported where they are used: the CLI imports this module
for `EvalConfig`, and `dolly --help` must stay instant.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import track
from rich.table import Table

from contract import IGNORE_INDEX, INPUT_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL, extract_response, render_generation_prompt
from contract import generation
from contract.errors import UserError
from pipelines.behaviour import (
    BEHAVIOUR_PLOT,
    BehaviourConfig,
    BehaviourReport,
    Mode,
    Sample,
    behaviour_table,
    ordered,
    plot_behaviour,
    summarize,
)
from pipelines.manifest import ManifestError, read_manifest, tokenizer_fingerprint, verify_manifest
from contract.registry import DEFAULT_ROOT, resolve

if TYPE_CHECKING:
    from contract.sampling import SamplingParams

LOSS_PLOT = "loss_by_category.png"
SAMPLES = "samples.jsonl"
REPORT = "report.json"

# The dolly-v2 model card's table (databricks/dolly-v2-12b on the Hub, "Benchmark Metrics"):
# EleutherAI LM Evaluation Harness, zero-shot. The card does not name the metric: we read its
# numbers as acc_norm where a task reports one (hellaswag 0.59 for pythia-2.8b is acc_norm-sized;
# that model's plain acc is far lower) and acc elsewhere (winogrande, boolq), and score ours alike.
DOLLY_V2_TASKS = ("openbookqa", "arc_easy", "winogrande", "hellaswag", "arc_challenge", "piqa", "boolq")
PUBLISHED_DOLLY_V2 = {  # the seven tasks' scores, then the card's geometric mean of them
    "EleutherAI/pythia-2.8b": (0.348, 0.585859, 0.589582, 0.591217, 0.323379, 0.73395, 0.638226, 0.523431),
    "EleutherAI/pythia-6.9b": (0.368, 0.604798, 0.608524, 0.631548, 0.343857, 0.761153, 0.6263, 0.543567),
    "databricks/dolly-v2-3b": (0.384, 0.611532, 0.589582, 0.650767, 0.370307, 0.742655, 0.575535, 0.544886),
    "EleutherAI/pythia-12b": (0.364, 0.627104, 0.636148, 0.668094, 0.346416, 0.760065, 0.673394, 0.559676),
    "databricks/dolly-v2-12b": (0.408, 0.63931, 0.616417, 0.707927, 0.388225, 0.757889, 0.568196, 0.56781),
    "databricks/dolly-v2-7b": (0.392, 0.633838, 0.607735, 0.686517, 0.406997, 0.750816, 0.644037, 0.573487),
}
LM_EVAL_REQUIREMENT = "lm_eval==0.4.13"


class EvalConfig(BaseModel):
    """`dolly eval`: held-out loss per category (against a base, if given), sample answers, and
    optionally the LM Evaluation Harness tasks of the dolly-v2 table."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("dolly@latest", description="model to evaluate: NAME@latest / NAME@N from the registry, an exported folder, a Hub id, pythia-<size>-random or smollm2-135m-instruct")
    base: str | None = Field(None, description="model to compare with, e.g. the base it was tuned from (same kinds of reference); null: no comparison")
    tokenizer: str | None = Field(None, description="tokenizer folder or Hub id for both models (default: each model's own; random shapes need one)")
    base_gguf_file: str | None = Field(None, description="GGUF file inside the base's folder to load (de-quantised); then also set tokenizer")
    data_dir: Path = Field(Path("runs/data"), description="shards and manifest written by `dolly data prepare`: the test split is scored")
    output_dir: Path = Field(Path("runs/eval"), description="reports go to <output_dir>/<model name>/")
    registry: Path = Field(DEFAULT_ROOT, description="model registry folder")
    batch_size: int = Field(8, ge=1, description="examples per forward pass (and per generation batch)")
    max_examples: int | None = Field(None, ge=1, description="score only this many test examples: a deterministic subset, round-robin over categories (default: all)")
    samples_per_category: int = Field(1, ge=0, description="test prompts per category to generate answers for (0: none)")
    max_new_tokens: int = Field(generation.MAX_NEW_TOKENS, ge=1, description="longest generated answer in tokens (Dolly's default)")
    temperature: float = Field(generation.TEMPERATURE, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(generation.TOP_P, gt=0, le=1, description="nucleus sampling (Dolly's default)")
    top_k: int = Field(generation.TOP_K, ge=0, description="top-k sampling (0: off, Dolly's default)")
    seed: int = Field(42, description="seed of sampling, and of random-shape weights (training's default, so a random base starts where training did)")
    harness: bool = Field(False, description="also run the LM Evaluation Harness (pip install lm_eval; its datasets come from the Hugging Face Hub)")
    tasks: list[str] = Field(list(DOLLY_V2_TASKS), description="lm-eval tasks (default: the dolly-v2 table's seven, zero-shot)")
    harness_limit: int | None = Field(None, ge=1, description="most examples per harness task (default: all; a limit is for smoke runs only)")
    harness_include_path: Path | None = Field(None, description="folder of extra lm-eval task YAML files (e.g. tasks over local data)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs (auto: a GPU if there is one; bf16 there, fp32 on CPU)")
    behaviour: BehaviourConfig = Field(default_factory=BehaviourConfig, description="answers to held-out instructions, scored for stop rate, repetition, ROUGE-L and length")


class CategoryLoss(BaseModel):
    # A random model's perplexity overflows to inf; JSON then holds Infinity, as Python reads it.
    model_config = ConfigDict(ser_json_inf_nan="constants")

    examples: int
    tokens: int  # response tokens scored (labels != -100)
    loss: float  # mean cross-entropy per response token, in nats
    perplexity: float


class LossReport(BaseModel):
    model: str  # display name
    overall: CategoryLoss
    by_category: dict[str, CategoryLoss]


class TaskScore(BaseModel):
    metric: str
    value: float
    stderr: float | None
    examples: int


class HarnessReport(BaseModel):
    model: str
    scores: dict[str, TaskScore]
    gmean: float | None  # geometric mean over the tasks, as the dolly-v2 table has


class ModelScores(BaseModel):
    """One model on the held-out split: how well it predicts the references, and how it answers."""

    loss: LossReport
    behaviour: list[BehaviourReport]  # one per mode

    def named(self, name: str) -> ModelScores:
        return ModelScores(loss=self.loss.model_copy(update={"model": name}),
                           behaviour=[r.model_copy(update={"model": name}) for r in self.behaviour])

    def mode(self, mode: Mode) -> BehaviourReport | None:
        return next((r for r in self.behaviour if r.mode == mode), None)


class EvalReport(BaseModel):
    config: EvalConfig
    losses: list[LossReport]  # the base first, if there is one
    behaviour: list[BehaviourReport]  # each model's, per mode, in the same order
    harness: list[HarnessReport]
    files: dict[str, str]


# ---------------------------------------------------------------------------- models


def resolve_model(spec: str, registry: Path = DEFAULT_ROOT) -> tuple[str, str]:
    """(what contract.models.load_model takes, display name): NAME@N and folders through the
    registry; Hub ids, random shapes and packaged models as they are."""
    if "@" in spec or Path(spec).is_dir():
        folder, name = resolve(spec, registry)
        return str(folder), name
    return spec, spec


class LoadedModel:
    """A model to evaluate: its tokenizer at once (enough to check data against, and cheap), its
    weights on first use (minutes for a large model), in eval mode on the chosen device."""

    def __init__(self, spec: str, *, registry: Path = DEFAULT_ROOT, tokenizer: str | None = None,
                 gguf_file: str | None = None, device: str = "auto", seed: int = 42):
        from contract.models import load_tokenizer, random_pythia_size

        self.ref, self.name = resolve_model(spec, registry)
        if tokenizer is None and random_pythia_size(self.ref):
            raise UserError(f"{self.ref} is a random shape with no tokenizer of its own: pass a tokenizer (e.g. ../shared/tokenizer/pythia)")
        try:
            self.tokenizer = load_tokenizer(tokenizer or self.ref)
        except OSError as e:
            raise UserError(f"could not load the tokenizer of {self.name} from {tokenizer or self.ref!r} ({e}): pass a tokenizer folder") from None
        self._gguf_file, self._device, self._seed = gguf_file, device, seed
        self._model = None

    @property
    def model(self):
        if self._model is None:
            import torch

            from contract.models import load_model

            cuda = self._device == "cuda" or (self._device == "auto" and torch.cuda.is_available())
            device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
            kwargs = {"dtype": dtype} | ({"gguf_file": self._gguf_file} if self._gguf_file else {})
            torch.manual_seed(self._seed)  # a random shape gets the weights training initialises with the same seed
            self._model = load_model(self.ref, self.tokenizer, **kwargs).to(device).eval()
        return self._model

    def release(self) -> None:
        """Free the weights (the next use loads them again)."""
        self._model = None


def _loaded(model: str | LoadedModel, registry: Path, tokenizer: str | None, gguf_file: str | None) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else LoadedModel(model, registry=registry, tokenizer=tokenizer, gguf_file=gguf_file)


# ---------------------------------------------------------------------------- held-out loss


def check_data(data_dir: Path, tokenizer, model_name: str) -> dict:
    """The verified manifest of `data_dir`, refusing shards made with another tokenizer: their
    token ids mean other words to this model, and the loss would be silently meaningless."""
    expected = read_manifest(data_dir)["tokenizer"]
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected["fingerprint"]:
        raise ManifestError(
            f"{data_dir} was tokenized with {expected['name_or_path']!r} ({expected['vocab_size']} ids, fingerprint "
            f"{expected['fingerprint'][:12]}), but {model_name} uses tokenizer {tokenizer.name_or_path!r} ({len(tokenizer)} ids, "
            f"fingerprint {actual[:12]}): prepare held-out data with the model's tokenizer, e.g. "
            f"dolly data prepare --out {data_dir}-eval --tokenizer {tokenizer.name_or_path}"
        )
    return verify_manifest(data_dir)  # the shards are the ones the manifest lists, rendered with our template


def read_heldout(data_dir: Path, max_examples: int | None = None) -> list[dict]:
    """The test split's rows (input_ids, labels, category) in shard order; with `max_examples`,
    the first that many of a round-robin over categories, so every category is represented."""
    import pyarrow.parquet as pq

    files = sorted((Path(data_dir) / "test").glob("*.parquet"))
    rows = [row for f in files for row in pq.read_table(f, columns=["input_ids", "labels", "category"]).to_pylist()]
    if max_examples is None:
        return rows
    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row)
    rounds = zip_longest(*(by_category[c] for c in sorted(by_category)))
    return [row for group in rounds for row in group if row is not None][:max_examples]


def heldout_loss(model: str | LoadedModel, data_dir: Path, *, registry: Path = DEFAULT_ROOT, tokenizer: str | None = None,
                 batch_size: int = 8, max_examples: int | None = None, gguf_file: str | None = None,
                 progress: bool = True) -> LossReport:
    """Mean cross-entropy per response token on `data_dir/test`, overall and per category."""
    lm = _loaded(model, registry, tokenizer, gguf_file)
    check_data(Path(data_dir), lm.tokenizer, lm.name)
    rows = read_heldout(Path(data_dir), max_examples)
    if not rows:
        raise UserError(f"{data_dir}/test holds no examples: prepare the data with test_size > 0")
    sums = _score(lm, rows, batch_size, progress)
    overall = [sum(column) for column in zip(*sums.values())]
    return LossReport(model=lm.name, overall=_category_loss(*overall),
                      by_category={c: _category_loss(*sums[c]) for c in ordered(sums)})


def _score(lm: LoadedModel, rows: list[dict], batch_size: int, progress: bool) -> dict[str, list]:
    """{category: [summed nll, response tokens, examples]}."""
    import torch
    import torch.nn.functional as F

    from pipelines.batches import collate

    model = lm.model
    # Similar lengths batched together waste less compute on padding; sums do not depend on order.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    batches = [[rows[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]
    sums: dict[str, list] = defaultdict(lambda: [0.0, 0, 0])
    with torch.inference_mode():
        for batch in track(batches, description=f"held-out loss of {lm.name}", disable=not progress):
            # Right padding with label -100, as training batches: under the causal mask no real token sees a pad.
            tensors = collate({"input_ids": [r["input_ids"] for r in batch], "labels": [r["labels"] for r in batch]},
                              lm.tokenizer.pad_token_id)
            logits = model(input_ids=tensors["input_ids"].to(model.device), position_ids=tensors["position_ids"].to(model.device),
                           use_cache=False).logits[:, :-1]
            labels = tensors["labels"][:, 1:].to(model.device)  # each token is predicted from the one before it
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
            for row, row_nll, tokens in zip(batch, nll.double().sum(-1).tolist(), (labels != IGNORE_INDEX).sum(-1).tolist()):
                total = sums[row["category"]]
                total[0] += row_nll
                total[1] += tokens
                total[2] += 1
    return sums


def _category_loss(nll: float, tokens: int, examples: int) -> CategoryLoss:
    loss = nll / tokens
    return CategoryLoss(examples=examples, tokens=tokens, loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf)


# ---------------------------------------------------------------------------- comparison


def loss_table(report: LossReport) -> Table:
    table = Table(title=f"Held-out loss of {report.model} (nats per response token)", title_justify="left")
    for column in ("category", "examples", "tokens", "loss", "perplexity"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name, c in [*report.by_category.items(), ("[bold]overall[/]", report.overall)]:
        table.add_row(name, f"{c.examples:,}", f"{c.tokens:,}", f"{c.loss:.4f}", _number(c.perplexity, 2))
    return table


def compare(base: LossReport, tuned: LossReport) -> Table:
    """Loss and perplexity per category, base vs tuned, with the change (green: tuned is better)."""
    table = Table(title=f"Held-out loss: {base.model} -> {tuned.model} (nats per response token)", title_justify="left")
    for column in ("category", "examples", "base loss", "tuned loss", "Δ loss", "base ppl", "tuned ppl", "Δ ppl"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name in [*ordered(set(base.by_category) | set(tuned.by_category)), "overall"]:
        b = base.overall if name == "overall" else base.by_category.get(name)
        t = tuned.overall if name == "overall" else tuned.by_category.get(name)
        if b is None or t is None:  # scored on different subsets
            table.add_row(name, "", *(f"{c.loss:.4f}" if c else "-" for c in (b, t)), "", "", "", "")
            continue
        table.add_row("[bold]overall[/]" if name == "overall" else name, f"{t.examples:,}",
                      f"{b.loss:.4f}", f"{t.loss:.4f}", _delta(t.loss - b.loss, 4),
                      _number(b.perplexity, 2), _number(t.perplexity, 2), _delta(t.perplexity - b.perplexity, 2))
    return table


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"  # an untrained model's perplexity is astronomical


def _delta(value: float, digits: int) -> str:
    colour = "green" if value < 0 else "red" if value > 0 else "default"
    return f"[{colour}]{'+' if value > 0 else ''}{_number(value, digits)}[/]"


def plot_comparison(reports: Sequence[LossReport], path: Path) -> Path:
    """Grouped bars of held-out loss per category (and overall), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    categories = [*ordered({c for r in reports for c in r.by_category}), "overall"]
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(categories)), 4.5))
    for i, report in enumerate(reports):
        values = [report.overall.loss if c == "overall" else report.by_category[c].loss if c in report.by_category else math.nan
                  for c in categories]
        bars = ax.bar([x + (i - (len(reports) - 1) / 2) * width for x in range(len(categories))], values, width, label=report.model)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    examples = {c: max((r.by_category[c].examples for r in reports if c in r.by_category), default=0) for c in categories[:-1]}
    examples["overall"] = max(r.overall.examples for r in reports)
    ax.set_xticks(range(len(categories)), [f"{c} ({examples[c]:,})" for c in categories], rotation=30, ha="right")
    ax.set_ylabel("loss (nats per response token)")
    ax.set_title("Held-out loss per category (lower is better)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- loss and behaviour together


def score_model(model: str | LoadedModel, data_dir: Path, behaviour: BehaviourConfig, *, max_examples: int | None = None,
                registry: Path = DEFAULT_ROOT, tokenizer: str | None = None,
                batch_size: int = 8) -> tuple[ModelScores, dict[str, list[Sample]]]:
    """Held-out loss and behaviour (every mode of `behaviour`) of one model, and the answers it
    gave, for reading. The held-out prompts are read (and their shards verified) once for all modes."""
    lm = _loaded(model, registry, tokenizer, None)
    loss = heldout_loss(lm, data_dir, batch_size=batch_size, max_examples=max_examples)
    prompts = heldout_prompts(lm, data_dir, behaviour.examples) if behaviour.modes else []
    reports, answers = [], {}
    for mode in behaviour.modes:
        report, answers[mode] = behaviour_on(lm, prompts, behaviour, mode)
        reports.append(report)
    return ModelScores(loss=loss, behaviour=reports), answers


def show_scores(scores: Sequence[ModelScores], folder: Path, console: Console,
                labels: tuple[str, str] = ("base", "tuned")) -> dict[str, str]:
    """One model's loss and behaviour, or two side by side (the first the reference): tables on
    the console, PNGs in `folder`; {"loss_plot": ..., "behaviour_plot": ...}."""
    console.print(compare(*(s.loss for s in scores)) if len(scores) == 2 else loss_table(scores[0].loss))
    for report in scores[0].behaviour:
        same_mode = [report, *(other for s in scores[1:] if (other := s.mode(report.mode)) is not None)]
        console.print(behaviour_table(same_mode, labels if len(same_mode) == 2 else None))
    files = {"loss_plot": str(plot_comparison([s.loss for s in scores], folder / LOSS_PLOT))}
    if all(s.behaviour for s in scores):
        files["behaviour_plot"] = str(plot_behaviour([r for s in scores for r in s.behaviour], folder / BEHAVIOUR_PLOT))
    return files


# ---------------------------------------------------------------------------- sample answers


def sample_generations(model: str | LoadedModel, source: Path | Sequence[dict], *, registry: Path = DEFAULT_ROOT,
                       tokenizer: str | None = None, gguf_file: str | None = None, per_category: int = 1,
                       max_new_tokens: int = generation.MAX_NEW_TOKENS, temperature: float = generation.TEMPERATURE,
                       top_p: float = generation.TOP_P, top_k: int = generation.TOP_K,
                       seed: int = 42, batch_size: int = 8) -> list[Sample]:
    """Answers to the first `per_category` prompts of each category, from a prepared data folder
    (its test split) or from records (dicts with instruction, context, response, category).

    Dolly's generation: its prompt and sampling (contract.generation; temperature 0: greedy),
    stopping at `### End`; the text is `extract_response` of the generation. Each prompt has its
    own seeded generator (seed + its index), so a seed gives the same answers on every run and
    in any batch."""
    from contract.sampling import SamplingParams

    lm = _loaded(model, registry, tokenizer, gguf_file)
    if isinstance(source, (str, Path)):
        check_data(Path(source), lm.tokenizer, lm.name)
        prompts = [_heldout_prompt(row, lm.tokenizer) for row in _first_per_category(read_heldout(Path(source)), per_category)]
    else:
        prompts = [_record_prompt(record, lm.tokenizer) for record in _first_per_category(source, per_category)]
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_new_tokens)
    return answer(lm, prompts, params, seed, batch_size)


def heldout_behaviour(model: str | LoadedModel, data_dir: Path, config: BehaviourConfig, mode: Mode, *,
                      registry: Path = DEFAULT_ROOT, tokenizer: str | None = None,
                      gguf_file: str | None = None) -> tuple[BehaviourReport, list[Sample]]:
    """Answers to `config.examples` held-out instructions, greedy or with Dolly's sampling, scored
    by `pipelines.behaviour`."""
    lm = _loaded(model, registry, tokenizer, gguf_file)
    return behaviour_on(lm, heldout_prompts(lm, data_dir, config.examples), config, mode)


def behaviour_on(lm: LoadedModel, prompts: list[dict], config: BehaviourConfig, mode: Mode) -> tuple[BehaviourReport, list[Sample]]:
    """`lm`'s answers to `prompts` in one mode, and their scores."""
    from contract.sampling import SamplingParams

    # SamplingParams' defaults are Dolly's sampling; greedy only changes the temperature.
    params = SamplingParams(max_tokens=config.max_new_tokens, frequency_penalty=config.frequency_penalty,
                            **({"temperature": 0.0} if mode == "greedy" else {}))
    samples = answer(lm, prompts, params, config.seed, config.batch_size, progress=f"{mode} answers of {lm.name}")
    return summarize(samples, mode, config.max_new_tokens, config.frequency_penalty), samples


def heldout_prompts(lm: LoadedModel, data_dir: Path, examples: int | None) -> list[dict]:
    """The prompts of `examples` held-out rows (the same round-robin subset as `heldout_loss`),
    from shards checked against the model's tokenizer."""
    check_data(Path(data_dir), lm.tokenizer, lm.name)
    prompts = [_heldout_prompt(row, lm.tokenizer) for row in read_heldout(Path(data_dir), examples)]
    if not prompts:
        raise UserError(f"{data_dir}/test holds no examples: prepare the data with test_size > 0")
    return prompts


def answer(lm: LoadedModel, prompts: list[dict], params: SamplingParams, seed: int, batch_size: int,
           progress: str | None = None) -> list[Sample]:
    """`lm`'s answers to prompts (from `_heldout_prompt` / `_record_prompt`), each with its own
    seed (seed + its index) and a budget that fits the model's context; prompts that leave no
    room for an answer are passed over."""
    from contract.models import max_length_for, stop_token_ids

    limit = max_length_for(lm.ref, lm.tokenizer)[0]
    prompts = [p for p in prompts if len(p["ids"]) < limit]
    per_prompt = [replace(params, seed=seed + i, max_tokens=min(params.max_tokens, limit - len(p["ids"])))
                  for i, p in enumerate(prompts)]
    generations = _generate(lm, [p["ids"] for p in prompts], per_prompt, stop_token_ids(Path(lm.ref), lm.tokenizer),
                            batch_size, progress)
    return [Sample(model=lm.name, category=p["category"], instruction=p["instruction"], context=p["context"],
                   reference=p["reference"], finish=finish,
                   generated=extract_response(lm.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)))
            for p, (ids, finish) in zip(prompts, generations)]


def _generate(lm: LoadedModel, prompts: list[list[int]], params: list, stop_ids: set[int], batch_size: int,
              progress: str | None = None) -> list[tuple[list[int], str]]:
    """(generated ids, finish reason) per prompt, decoded with serving's batch decoder."""
    from contract.decode import BatchDecoder

    decoder = BatchDecoder(lm.model, lm.tokenizer.pad_token_id)
    results = []
    starts = range(0, len(prompts), batch_size)
    for start in track(starts, description=progress or "", disable=progress is None):
        rows, tokens = decoder.add(prompts[start:start + batch_size], params[start:start + batch_size])
        budget = dict(zip(rows, (p.max_tokens for p in params[start:start + batch_size])))
        generated: dict[int, list[int]] = {row: [] for row in rows}
        finish: dict[int, str] = {}
        while decoder.rows:
            for row, token in zip(decoder.rows, tokens):
                if token in stop_ids:
                    finish[row] = "stop"
                    continue
                generated[row].append(token)
                if len(generated[row]) >= budget[row]:
                    finish[row] = "length"
            decoder.keep([row for row in decoder.rows if row not in finish])
            if decoder.rows:
                tokens = decoder.step()
        results += [(generated[row], finish[row]) for row in rows]
    return results


def _first_per_category(items: Iterable[dict], n: int) -> list[dict]:
    """The first n items of each category, categories in Dolly's order."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        if len(by_category[item["category"]]) < n:
            by_category[item["category"]].append(item)
    return [item for category in ordered(by_category) for item in by_category[category]]


def _heldout_prompt(row: dict, tokenizer) -> dict:
    """A test-split row's prompt tokens, exactly as trained on; instruction, context and
    reference decoded back for the report."""
    n_prompt = row["labels"].count(IGNORE_INDEX)
    text = tokenizer.decode(row["input_ids"][:n_prompt], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # The prompt is intro, "### Instruction:\n" instruction, ["\n\nInput:\n" context], "\n\n### Response:\n".
    body = text.split(f"{INSTRUCTION_KEY}\n", 1)[1].removesuffix(f"\n\n{RESPONSE_KEY_NL}")
    instruction, _, context = body.partition(f"\n\n{INPUT_KEY}\n")
    reference = tokenizer.decode(row["input_ids"][n_prompt:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return {"category": row["category"], "instruction": instruction, "context": context,
            "reference": extract_response(reference), "ids": row["input_ids"][:n_prompt]}


def _record_prompt(record: dict, tokenizer) -> dict:
    context = record.get("context", "")
    ids = tokenizer(render_generation_prompt(record["instruction"], context), add_special_tokens=False)["input_ids"]
    return {"category": record["category"], "instruction": record["instruction"], "context": context,
            "reference": record["response"], "ids": ids}


def write_samples(samples: Sequence[Sample], path: Path) -> Path:
    """JSON lines at `path`, and the same as markdown beside it, for reading side by side."""
    path.write_text("".join(s.model_dump_json() + "\n" for s in samples))
    blocks = []
    for s in samples:
        context = f"**Context:** {s.context}\n\n" if s.context else ""
        blocks.append(f"## {s.category} — {s.model}\n\n**Instruction:** {s.instruction}\n\n{context}"
                      f"**Reference:** {s.reference}\n\n**Generated** ({s.finish}): {s.generated}\n")
    path.with_suffix(".md").write_text("\n".join(blocks))
    return path


# ---------------------------------------------------------------------------- LM Evaluation Harness


def lm_eval_harness(model: str | LoadedModel, tasks: Sequence[str] = DOLLY_V2_TASKS, *, registry: Path = DEFAULT_ROOT,
                    tokenizer: str | None = None, gguf_file: str | None = None, batch_size: int = 8,
                    limit: int | None = None, include_path: Path | None = None, seed: int = 42) -> HarnessReport:
    """Zero-shot lm-eval `tasks` scored with our model (loaded through the contract, so registry
    names, random shapes and packaged models work), by lm-eval's own HF scorer. The tasks'
    datasets are fetched first: where they cannot be reached, this fails before loading the model."""
    lm = _loaded(model, registry, tokenizer, gguf_file)  # a wrong model reference fails before the datasets download
    loaded_tasks = load_harness_tasks(tasks, include_path)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    scorer = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=scorer, tasks=list(loaded_tasks.values()), num_fewshot=0, limit=limit,
                                  log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    scores = {name: _headline(out["results"][name], out["n-samples"][name]["effective"]) for name in loaded_tasks}
    return HarnessReport(model=lm.name, scores=scores, gmean=_gmean([s.value for s in scores.values()]))


def load_harness_tasks(tasks: Sequence[str], include_path: Path | None = None) -> dict:
    """{name: lm-eval Task} with its dataset downloaded, or a UserError saying what is missing:
    lm-eval itself, a task, or the network the datasets come from."""
    try:
        from datasets.exceptions import DatasetsError
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"the LM Evaluation Harness is not installed: pip install '{LM_EVAL_REQUIREMENT}' "
                        "(the project's `eval` extra)") from None
    # Indexing lm-eval's thousands of built-in task files takes ~10 s: skipped when the include
    # path has every task asked for.
    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)} (list them with `lm_eval ls tasks`)")
    try:
        return manager.load(list(tasks))["tasks"]
    except (OSError, DatasetsError) as e:  # ConnectionError and the Hub's offline errors are OSErrors
        raise UserError(
            f"the datasets of lm-eval task(s) {', '.join(tasks)} could not be reached ({type(e).__name__}: {e}). "
            "The harness downloads them from the Hugging Face Hub: run `dolly eval --harness` where huggingface.co "
            "is reachable, or copy a datasets cache filled there (HF_HOME) to this machine and set HF_HUB_OFFLINE=1"
        ) from None


def _headline(result: dict, examples: int) -> TaskScore:
    """acc_norm where the task reports it, else acc (see PUBLISHED_DOLLY_V2), else its first metric."""
    metrics = [key.split(",")[0] for key in result if "," in key and "_stderr" not in key]
    metric = next((m for m in ("acc_norm", "acc") if m in metrics), metrics[0])
    stderr = result.get(f"{metric}_stderr,none")
    return TaskScore(metric=metric, value=result[f"{metric},none"], stderr=stderr if isinstance(stderr, float) else None,
                     examples=examples)


def _gmean(values: Sequence[float]) -> float | None:
    return math.prod(values) ** (1 / len(values)) if values else None


def harness_table(reports: Sequence[HarnessReport]) -> Table:
    """Our scores (bold) under the dolly-v2 model card's where the tasks are the card's, laid
    out as the card has them."""
    tasks = list(dict.fromkeys(t for r in reports for t in r.scores))
    table = Table(title="LM Evaluation Harness, zero-shot", title_justify="left")
    table.add_column("model")
    for task in [*tasks, "gmean"]:
        table.add_column(task, justify="right")
    if set(tasks) & set(DOLLY_V2_TASKS):
        for name, (*values, card_gmean) in PUBLISHED_DOLLY_V2.items():
            published = dict(zip(DOLLY_V2_TASKS, values))
            gmean = card_gmean if set(tasks) == set(DOLLY_V2_TASKS) else None
            table.add_row(f"[dim]{name} (model card)[/]", *(f"[dim]{published[t]:.4f}[/]" if t in published else "-" for t in tasks),
                          f"[dim]{gmean:.4f}[/]" if gmean is not None else "-")
    for report in reports:
        table.add_row(f"[bold]{report.model}[/]", *(f"[bold]{report.scores[t].value:.4f}[/]" if t in report.scores else "-" for t in tasks),
                      f"[bold]{report.gmean:.4f}[/]" if report.gmean is not None else "-")
    return table


# ---------------------------------------------------------------------------- `dolly eval`


def evaluate(config: EvalConfig, console: Console | None = None) -> EvalReport:
    """Everything `dolly eval` does: both models' data checked first, then each model in turn
    (loss, samples, harness) so only one is in memory; report.json, the plot and samples written."""
    console = console or Console()
    specs = [(config.base, config.base_gguf_file)] if config.base else []
    models = [LoadedModel(spec, registry=config.registry, tokenizer=config.tokenizer, gguf_file=gguf, device=config.device,
                          seed=config.seed) for spec, gguf in [*specs, (config.model, None)]]
    # Before any weights load: a tokenizer mismatch or unreachable harness datasets fail in
    # seconds, not after the first model's evaluation (the datasets stay cached for later).
    for lm in models:
        check_data(config.data_dir, lm.tokenizer, lm.name)
    if config.harness:
        load_harness_tasks(config.tasks, config.harness_include_path)
    out = config.output_dir / re.sub(r"[^A-Za-z0-9._@-]+", "_", models[-1].name)
    out.mkdir(parents=True, exist_ok=True)

    scores, samples, harness, answers = [], [], [], defaultdict(list)
    for lm in models:
        scored, given = score_model(lm, config.data_dir, config.behaviour, max_examples=config.max_examples,
                                    batch_size=config.batch_size)
        scores.append(scored)
        for mode, given_in_mode in given.items():
            answers[mode] += given_in_mode
        if config.samples_per_category:
            samples += sample_generations(lm, config.data_dir, per_category=config.samples_per_category,
                                          max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                          top_p=config.top_p, top_k=config.top_k, seed=config.seed, batch_size=config.batch_size)
        if config.harness:
            harness.append(lm_eval_harness(lm, config.tasks, batch_size=config.batch_size, limit=config.harness_limit,
                                           include_path=config.harness_include_path, seed=config.seed))
        lm.release()

    shown = show_scores(scores, out, console)
    files = {"report": str(out / REPORT), "plot": shown.pop("loss_plot"), **shown}
    for mode, given in answers.items():
        files[f"answers_{mode}"] = str(write_samples(given, out / f"answers-{mode}.jsonl"))
    if samples:
        files["samples"] = str(write_samples(samples, out / SAMPLES))
    if harness:
        console.print(harness_table(harness))
    report = EvalReport(config=config, losses=[s.loss for s in scores], behaviour=[r for s in scores for r in s.behaviour],
                        harness=harness, files=files)
    (out / REPORT).write_text(report.model_dump_json(indent=2) + "\n")
    for kind, path in files.items():
        console.print(f"[bold]{kind.replace('_', ' ').capitalize()}[/] {path}")
    return report
