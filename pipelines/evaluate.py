"""`dolly eval`, and the scoring `dolly up` and `dolly retrain` share: how good a tuned model is,
next to its base.

- `score_model`: held-out loss per Dolly category (`pipelines.loss`) and behaviour on held-out
  instructions (`pipelines.answers`, scored by `pipelines.behaviour`) of one model;
  `show_scores` shows one model or two side by side, as tables and PNGs.
- `evaluate`: both models' data checked first, then each model scored in turn, with sample
  answers, the mistakes people flagged (`pipelines.flagged`) and the LM Evaluation Harness
  (`pipelines.harness`) if asked; the reports written.

Its settings, `EvalConfig`, live in `pipelines.configs`, which the CLI imports without torch.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

from contract.registry import DEFAULT_ROOT
from pipelines.answers import behaviour_on, heldout_prompts, sample_generations, write_samples
from pipelines.behaviour import BEHAVIOUR_PLOT, BehaviourConfig, BehaviourReport, Mode, Sample, behaviour_table, plot_behaviour
from pipelines.configs import EvalConfig
from pipelines.flagged import FLAGGED_ANSWERS, FlaggedReport, flagged_table, read_flagged, score_flagged, write_flagged
from pipelines.harness import HarnessReport, harness_table, lm_eval_harness, load_harness_tasks
from pipelines.heldout import LoadedModel, check_data, loaded_model
from pipelines.loss import LossReport, compare, heldout_loss, loss_table, plot_comparison
from pipelines.manifest import VerifiedData

LOSS_PLOT = "loss_by_category.png"
SAMPLES = "samples.jsonl"
REPORT = "report.json"


class ModelScores(BaseModel):
    """One model on the held-out split: how well it predicts the references, and how it answers."""

    loss: LossReport
    behaviour: list[BehaviourReport]  # one per mode

    def named(self, name: str) -> ModelScores:
        return ModelScores(
            loss=self.loss.model_copy(update={"model": name}),
            behaviour=[r.model_copy(update={"model": name}) for r in self.behaviour],
        )

    def mode(self, mode: Mode) -> BehaviourReport | None:
        return next((r for r in self.behaviour if r.mode == mode), None)


class EvalReport(BaseModel):
    config: EvalConfig
    losses: list[LossReport]  # the base first, if there is one
    behaviour: list[BehaviourReport]  # each model's, per mode, in the same order
    harness: list[HarnessReport]
    flagged: list[FlaggedReport] = []  # with `feedback`: each model on the corrections held out there
    files: dict[str, str]


def score_model(
    model: str | LoadedModel,
    data_dir: Path | VerifiedData,
    behaviour: BehaviourConfig,
    *,
    max_examples: int | None = None,
    registry: Path = DEFAULT_ROOT,
    tokenizer: str | None = None,
    batch_size: int = 8,
) -> tuple[ModelScores, dict[str, list[Sample]]]:
    """Held-out loss and behaviour (every mode of `behaviour`) of one model, and the answers it
    gave, for reading. The shards are verified once (not at all when `data_dir` comes verified), and
    the held-out prompts read once for all modes."""
    lm = loaded_model(model, registry, tokenizer, None)
    data = check_data(data_dir, lm)
    loss = heldout_loss(lm, data, batch_size=batch_size, max_examples=max_examples)
    prompts = heldout_prompts(lm, data, behaviour.examples) if behaviour.modes else []
    reports, answers = [], {}
    for mode in behaviour.modes:
        report, answers[mode] = behaviour_on(lm, prompts, behaviour, mode)
        reports.append(report)
    return ModelScores(loss=loss, behaviour=reports), answers


def show_scores(
    scores: Sequence[ModelScores], folder: Path, console: Console, labels: tuple[str, str] = ("base", "tuned")
) -> dict[str, str]:
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


def evaluate(config: EvalConfig, console: Console | None = None) -> EvalReport:
    """Everything `dolly eval` does: both models' data checked first, then each model in turn
    (loss, samples, harness) so only one is in memory; report.json, the plot and samples written."""
    console = console or Console()
    specs = [(config.base, config.base_gguf_file)] if config.base else []
    models = [
        LoadedModel(
            spec, registry=config.registry, tokenizer=config.tokenizer, gguf_file=gguf, device=config.device, seed=config.seed
        )
        for spec, gguf in [*specs, (config.model, None)]
    ]
    # Before any weights load: a tokenizer mismatch or unreachable harness datasets fail in
    # seconds, not after the first model's evaluation (the datasets stay cached for later).
    data = config.data_dir
    for lm in models:
        data = check_data(data, lm)  # the shards are hashed for the first; the others check their tokenizer
    if config.harness:
        load_harness_tasks(config.tasks, config.harness_include_path)
    corrections = read_flagged(config.feedback) if config.feedback else []
    out = config.output_dir / re.sub(r"[^A-Za-z0-9._@-]+", "_", models[-1].name)
    out.mkdir(parents=True, exist_ok=True)

    scores, samples, harness, flagged, answers = [], [], [], [], defaultdict(list)
    for lm in models:
        scored, given = score_model(lm, data, config.behaviour, max_examples=config.max_examples, batch_size=config.batch_size)
        scores.append(scored)
        for mode, given_in_mode in given.items():
            answers[mode] += given_in_mode
        if config.samples_per_category:
            samples += sample_generations(
                lm,
                data,
                per_category=config.samples_per_category,
                decoding=config.decoding,
                seed=config.seed,
                batch_size=config.batch_size,
            )
        if corrections:
            flagged.append(
                score_flagged(
                    lm,
                    corrections,
                    batch_size=config.batch_size,
                    max_new_tokens=config.behaviour.decoding.max_tokens,
                    seed=config.seed,
                )
            )
        if config.harness:
            harness.append(
                lm_eval_harness(
                    lm,
                    config.tasks,
                    batch_size=config.batch_size,
                    limit=config.harness_limit,
                    include_path=config.harness_include_path,
                    seed=config.seed,
                )
            )
        lm.release()

    shown = show_scores(scores, out, console)
    files = {"report": str(out / REPORT), "plot": shown.pop("loss_plot"), **shown}
    for mode, given in answers.items():
        files[f"answers_{mode}"] = str(write_samples(given, out / f"answers-{mode}.jsonl"))
    if samples:
        files["samples"] = str(write_samples(samples, out / SAMPLES))
    if flagged:
        console.print(flagged_table([report for report, _ in flagged]))
        files["flagged_answers"] = str(write_flagged([a for _, given in flagged for a in given], out / FLAGGED_ANSWERS))
    if harness:
        console.print(harness_table(harness))
    report = EvalReport(
        config=config,
        losses=[s.loss for s in scores],
        behaviour=[r for s in scores for r in s.behaviour],
        harness=harness,
        flagged=[report for report, _ in flagged],
        files=files,
    )
    (out / REPORT).write_text(report.model_dump_json(indent=2) + "\n")
    for kind, path in files.items():
        console.print(f"[bold]{kind.replace('_', ' ').capitalize()}[/] {path}")
    return report
