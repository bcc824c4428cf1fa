"""The EleutherAI LM Evaluation Harness: lm-eval's tasks scored with our model, printed beside the
dolly-v2 model card's table.

lm-eval (and the `datasets` it brings) is an optional extra, imported where it is used: without
it, everything else in `dolly eval` works, and asking for the harness says how to install it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel
from rich.table import Table

from contract.errors import UserError
from contract.registry import DEFAULT_ROOT
from pipelines.configs import DOLLY_V2_TASKS
from pipelines.heldout import LoadedModel, loaded_model

# The dolly-v2 model card's table (databricks/dolly-v2-12b on the Hub, "Benchmark Metrics"):
# EleutherAI LM Evaluation Harness, zero-shot. The card does not name the metric: we read its
# numbers as acc_norm where a task reports one (hellaswag 0.59 for pythia-2.8b is acc_norm-sized;
# that model's plain acc is far lower) and acc elsewhere (winogrande, boolq), and score ours alike.
PUBLISHED_DOLLY_V2 = {  # the seven tasks' scores (DOLLY_V2_TASKS' order), then the card's geometric mean of them
    "EleutherAI/pythia-2.8b": (0.348, 0.585859, 0.589582, 0.591217, 0.323379, 0.73395, 0.638226, 0.523431),
    "EleutherAI/pythia-6.9b": (0.368, 0.604798, 0.608524, 0.631548, 0.343857, 0.761153, 0.6263, 0.543567),
    "databricks/dolly-v2-3b": (0.384, 0.611532, 0.589582, 0.650767, 0.370307, 0.742655, 0.575535, 0.544886),
    "EleutherAI/pythia-12b": (0.364, 0.627104, 0.636148, 0.668094, 0.346416, 0.760065, 0.673394, 0.559676),
    "databricks/dolly-v2-12b": (0.408, 0.63931, 0.616417, 0.707927, 0.388225, 0.757889, 0.568196, 0.56781),
    "databricks/dolly-v2-7b": (0.392, 0.633838, 0.607735, 0.686517, 0.406997, 0.750816, 0.644037, 0.573487),
}
LM_EVAL_REQUIREMENT = "lm_eval==0.4.13"


class TaskScore(BaseModel):
    metric: str
    value: float
    stderr: float | None
    examples: int


class HarnessReport(BaseModel):
    model: str
    scores: dict[str, TaskScore]
    gmean: float | None  # geometric mean over the tasks, as the dolly-v2 table has


def lm_eval_harness(
    model: str | LoadedModel,
    tasks: Sequence[str] = DOLLY_V2_TASKS,
    *,
    registry: Path = DEFAULT_ROOT,
    tokenizer: str | None = None,
    gguf_file: str | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    include_path: Path | None = None,
    seed: int = 42,
) -> HarnessReport:
    """Zero-shot lm-eval `tasks` scored with our model (loaded through the contract, so registry
    names, random shapes and packaged models work), by lm-eval's own HF scorer. The tasks'
    datasets are fetched first: where they cannot be reached, this fails before loading the model."""
    lm = loaded_model(model, registry, tokenizer, gguf_file)  # a wrong model reference fails before the datasets download
    loaded_tasks = load_harness_tasks(tasks, include_path)
    # Optional, and present: load_harness_tasks has said how to install it where it is missing.
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    scorer = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=scorer,
        tasks=list(loaded_tasks.values()),
        num_fewshot=0,
        limit=limit,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    scores = {name: _headline(out["results"][name], out["n-samples"][name]["effective"]) for name in loaded_tasks}
    return HarnessReport(model=lm.name, scores=scores, gmean=_gmean([s.value for s in scores.values()]))


def load_harness_tasks(tasks: Sequence[str], include_path: Path | None = None) -> dict:
    """{name: lm-eval Task} with its dataset downloaded, or a UserError saying what is missing:
    lm-eval itself, a task, or the network the datasets come from."""
    try:  # an optional extra: imported here, so without it `dolly eval` says how to install it
        from datasets.exceptions import DatasetsError
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            f"the LM Evaluation Harness is not installed: pip install '{LM_EVAL_REQUIREMENT}' (the project's `eval` extra)"
        ) from None
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
    return TaskScore(
        metric=metric, value=result[f"{metric},none"], stderr=stderr if isinstance(stderr, float) else None, examples=examples
    )


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
            table.add_row(
                f"[dim]{name} (model card)[/]",
                *(f"[dim]{published[t]:.4f}[/]" if t in published else "-" for t in tasks),
                f"[dim]{gmean:.4f}[/]" if gmean is not None else "-",
            )
    for report in reports:
        table.add_row(
            f"[bold]{report.model}[/]",
            *(f"[bold]{report.scores[t].value:.4f}[/]" if t in report.scores else "-" for t in tasks),
            f"[bold]{report.gmean:.4f}[/]" if report.gmean is not None else "-",
        )
    return table
