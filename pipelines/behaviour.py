"""How a model behaves when asked, not only how well it predicts: does it end its answers, does it
loop, how close is it to the human-written reference, and how long does it talk.

Held-out loss cannot see a model that no longer stops or that repeats itself; these numbers can.
They are computed on answers (`Sample`s), whatever generated them:

- stop rate: share of answers that ended with a stop token (`### End`, or the model's eos) within
  the token budget, instead of running to it;
- repetition: share of an answer's word 4-grams that repeat an earlier one (0 for a fresh answer,
  near 1 for a loop); an answer above `LOOP_THRESHOLD` counts as looping;
- ROUGE-L: F1 of the longest common subsequence with the reference, by Google's `rouge-score`
  (stemmed), the implementation the summarization literature reports;
- length: words in the answer and in the reference.

Scores are per Dolly category and overall; `behaviour_table` and `plot_behaviour` put models side
by side.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.table import Table

from contract.decoding import Decoding
from contract.records import DOLLY_CATEGORIES

Mode = Literal["greedy", "sampled"]
NGRAM = 4
# The share of repeated 4-grams above which an answer reads as a loop: a normal answer of Dolly's
# corpus repeats almost none (bench/RESULTS.md), "Red, Blue, Green, ..." repeats most.
LOOP_THRESHOLD = 0.3
BEHAVIOUR_PLOT = "behaviour_by_category.png"
# Tokens an answer has to end in. Dolly's answers mostly fit (its 256 is a serving limit, not a
# length people ask for), and a budget half as long halves the scoring time.
ANSWER_BUDGET = 128


class BehaviourConfig(BaseModel):
    """Which answers to generate for the behavioural scores."""

    model_config = ConfigDict(extra="forbid")

    modes: list[Mode] = Field(
        ["greedy", "sampled"],
        description="greedy (the decoding at temperature 0), and/or sampled with the decoding (seeded); [] for none",
    )
    examples: int | None = Field(
        64, ge=1, description="held-out instructions answered: a round-robin over categories (null: all)"
    )
    batch_size: int = Field(16, ge=1, description="answers generated together")
    seed: int = Field(
        42, description="seed of the sampled answers (each prompt has its own, so any batch gives the same answers)"
    )
    decoding: Decoding = Field(
        Decoding(max_tokens=ANSWER_BUDGET),
        description="how the answers are decoded (Dolly's sampling by default); max_tokens is the budget: an answer "
        "that has not ended by then did not stop; score with what the API serves",
    )

    @field_validator("decoding", mode="before")
    @classmethod
    def _over_the_default(cls, value):
        """A decoding given in part (behaviour.decoding.temperature=1) changes what it names of
        this config's default, and keeps the rest (the budget, the penalty)."""
        return cls.model_fields["decoding"].default.model_dump() | value if isinstance(value, dict) else value

    def decoding_for(self, mode: Mode) -> Decoding:
        return self.decoding.greedy() if mode == "greedy" else self.decoding


class Sample(BaseModel):
    model: str
    category: str
    instruction: str
    context: str
    reference: str
    generated: str  # extract_response of the generation: cut at `### End` / `### Instruction:`
    finish: Literal["stop", "length"]  # stopped at a stop token, or ran to the token budget


class BehaviourScores(BaseModel):
    examples: int
    stop_rate: float  # share of answers that ended within the budget
    repetition: float  # mean share of repeated word 4-grams
    loop_rate: float  # share of answers whose repetition exceeds LOOP_THRESHOLD
    rouge_l: float  # mean ROUGE-L F1 against the reference
    words: float  # mean words per answer
    reference_words: float  # mean words per reference
    length_ratio: float  # words / reference_words


class BehaviourReport(BaseModel):
    model: str
    mode: Mode
    decoding: Decoding  # what the answers were decoded with (greedy: temperature 0)
    overall: BehaviourScores
    by_category: dict[str, BehaviourScores]


def repetition(text: str, n: int = NGRAM) -> float:
    """Share of the word n-grams of `text` that already occurred earlier in it."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(answer: str, reference: str) -> float:
    return _rouge().score(reference, answer)["rougeL"].fmeasure


def summarize(samples: Sequence[Sample], mode: Mode, decoding: Decoding) -> BehaviourReport:
    """One model's answers scored, per category (in Dolly's order) and overall."""
    if not samples:
        raise ValueError("no answers to score")
    if len({s.model for s in samples}) != 1:
        raise ValueError(f"answers of several models: {sorted({s.model for s in samples})}; score each on its own")
    by_category: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_category[sample.category].append(sample)
    return BehaviourReport(
        model=samples[0].model,
        mode=mode,
        decoding=decoding,
        overall=_scores(samples),
        by_category={c: _scores(by_category[c]) for c in ordered(by_category)},
    )


def _scores(samples: Sequence[Sample]) -> BehaviourScores:
    n = len(samples)
    repeats = [repetition(s.generated) for s in samples]
    words = sum(len(s.generated.split()) for s in samples) / n
    reference_words = sum(len(s.reference.split()) for s in samples) / n
    return BehaviourScores(
        examples=n,
        stop_rate=sum(s.finish == "stop" for s in samples) / n,
        repetition=sum(repeats) / n,
        loop_rate=sum(r > LOOP_THRESHOLD for r in repeats) / n,
        rouge_l=sum(rouge_l(s.generated, s.reference) for s in samples) / n,
        words=words,
        reference_words=reference_words,
        length_ratio=words / reference_words if reference_words else 0.0,
    )


def ordered(categories) -> list[str]:
    """Dolly's categories in the corpus's order, then any others alphabetically."""
    known = [c for c in DOLLY_CATEGORIES if c in categories]
    return known + sorted(set(categories) - set(known))


# ---------------------------------------------------------------------------- side by side

# (column, attribute, format, which way is better: +1 higher, -1 lower, 0 neither)
_COLUMNS = (
    ("stop", "stop_rate", "{:.0%}", 1),
    ("repeat", "repetition", "{:.2f}", -1),
    ("loops", "loop_rate", "{:.0%}", -1),
    ("ROUGE-L", "rouge_l", "{:.3f}", 1),
    ("words", "words", "{:.0f}", 0),
)


def behaviour_table(reports: Sequence[BehaviourReport], labels: Sequence[str] | None = None) -> Table:
    """Models side by side per category, for one mode: the first report is the reference the
    others are compared with (a better value green, a worse one red). `labels` head the columns
    (default: base and tuned for two models, else 1, 2, ...)."""
    labels = labels or (("base", "tuned") if len(reports) == 2 else [str(i + 1) for i in range(len(reports))])
    decoding = f"{reports[0].mode}: {reports[0].decoding.describe()}"
    table = Table(
        title=f"Behaviour on held-out instructions ({decoding}): " + " vs ".join(r.model for r in reports), title_justify="left"
    )
    table.add_column("category")
    table.add_column("n", justify="right")
    for header, *_ in _COLUMNS:
        for label in labels:
            table.add_column(f"{header} {label}", justify="right")
    table.add_column("ref words", justify="right")
    categories = ordered({c for r in reports for c in r.by_category})
    for category in [*categories, "overall"]:
        rows = [r.overall if category == "overall" else r.by_category.get(category) for r in reports]
        first = rows[0]
        cells = []
        for _, attribute, fmt, better in _COLUMNS:
            for row in rows:
                if row is None:
                    cells.append("-")
                    continue
                value, text = getattr(row, attribute), fmt.format(getattr(row, attribute))
                if row is not first and first is not None and better and value != getattr(first, attribute):
                    text = f"[{'green' if (value - getattr(first, attribute)) * better > 0 else 'red'}]{text}[/]"
                cells.append(text)
        n = max(row.examples for row in rows if row is not None)
        reference = next(row.reference_words for row in rows if row is not None)
        style = "bold" if category == "overall" else None
        table.add_row(category, str(n), *cells, f"{reference:.0f}", style=style)
    return table


def plot_behaviour(reports: Sequence[BehaviourReport], path: Path) -> Path:
    """Stop rate, loop rate and ROUGE-L per category, models side by side, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r.mode for r in reports))
    metrics = (
        ("stop_rate", "stop rate (higher is better)"),
        ("loop_rate", "looping answers (lower is better)"),
        ("rouge_l", "ROUGE-L vs reference (higher is better)"),
    )
    categories = [*ordered({c for r in reports for c in r.by_category}), "overall"]
    fig, axes = plt.subplots(
        len(metrics), len(modes), figsize=(max(8.0, 1.1 * len(categories)) * len(modes), 9), squeeze=False, sharex=True
    )
    for col, mode in enumerate(modes):
        group = [r for r in reports if r.mode == mode]
        width = 0.8 / len(group)
        for row, (attribute, label) in enumerate(metrics):
            ax = axes[row][col]
            for i, report in enumerate(group):
                values = [
                    getattr(report.overall if c == "overall" else report.by_category[c], attribute)
                    if c == "overall" or c in report.by_category
                    else float("nan")
                    for c in categories
                ]
                ax.bar(
                    [x + (i - (len(group) - 1) / 2) * width for x in range(len(categories))], values, width, label=report.model
                )
            ax.set_ylim(0, 1)
            ax.set_ylabel(label, fontsize=8)
            if row == 0:
                ax.set_title(f"{mode} answers: {group[0].decoding.describe()}")
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
