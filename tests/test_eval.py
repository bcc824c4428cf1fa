"""`dolly eval` on tiny models and a prepared slice of the real corpus: losses equal the model's
own loss on the response tokens, counts reconcile with the manifest, foreign shards are refused,
sampling is seeded and stops at `### End`, and lm-eval scores our model."""

from __future__ import annotations

import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from typer import Typer
from typer.testing import CliRunner

from cli.eval import eval_command
from contract import END_KEY, registry
from contract.decoding import Decoding
from contract.errors import UserError
from contract.feedback import FeedbackStore
from contract.models import load_model, load_tokenizer
from contract.records import DOLLY_CATEGORIES
from contract.sampling import SamplingParams
from pipelines.answers import answer, record_prompt, sample_generations
from pipelines.configs import DOLLY_V2_TASKS
from pipelines.harness import PUBLISHED_DOLLY_V2, HarnessReport, TaskScore, harness_table, lm_eval_harness
from pipelines.heldout import LoadedModel, read_heldout
from pipelines.loss import compare, heldout_loss, plot_comparison
from pipelines.manifest import read_manifest
from tests.conftest import export_tiny_model, prepared

PER_CATEGORY = 3  # records per category in the slice (summarization has only 2 short ones)
TEST_SIZE = 12


@pytest.fixture(scope="module")
def slice_records(corpus_path) -> list[dict]:
    """Short records of every Dolly category, from the real corpus."""
    taken: dict[str, int] = defaultdict(int)
    records = []
    for line in corpus_path.open():
        r = json.loads(line)
        if len(r["instruction"]) + len(r["context"]) + len(r["response"]) < 250 and taken[r["category"]] < PER_CATEGORY:
            taken[r["category"]] += 1
            records.append(r)
    return records


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, slice_records, tokenizer_path, ray_cluster) -> Path:
    return prepared(tmp_path_factory.mktemp("eval-data"), slice_records, tokenizer_path, max_length=128, test_size=TEST_SIZE)


@pytest.fixture(scope="module")
def report(tiny_model, heldout):
    return heldout_loss(str(tiny_model), heldout, batch_size=4, progress=False)


@pytest.mark.timeout(300)
def test_per_category_loss_is_the_models_own_loss_on_response_tokens_only(tiny_model, heldout, report):
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), tokenizer, dtype=torch.float32).eval()
    expected, unmasked = defaultdict(lambda: [0.0, 0]), [0.0, 0]
    with torch.no_grad():
        for row in read_heldout(heldout):  # one example at a time: no batching, no padding
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            tokens = int((labels[:, 1:] != -100).sum())
            expected[row["category"]][0] += model(input_ids=ids, labels=labels).loss.item() * tokens
            expected[row["category"]][1] += tokens
            unmasked[0] += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            unmasked[1] += ids.shape[1] - 1
    assert len(expected) >= 3, "the held-out slice should span several categories"
    for category, (nll, tokens) in expected.items():
        assert report.by_category[category].tokens == tokens
        assert report.by_category[category].loss == pytest.approx(nll / tokens, rel=1e-4)
    # Negative control: scored over prompt tokens too, the number is another one.
    assert report.overall.loss != pytest.approx(unmasked[0] / unmasked[1], rel=1e-3)
    assert report.overall.tokens < unmasked[1]


@pytest.mark.timeout(300)
def test_overall_is_token_weighted_and_counts_reconcile_with_the_manifest(tiny_model, heldout, report):
    split = read_manifest(heldout)["splits"]["test"]
    assert {c: v.examples for c, v in report.by_category.items()} == split["by_category"]
    assert report.overall.examples == split["examples"] == TEST_SIZE
    assert report.overall.tokens == split["response_tokens"] == sum(c.tokens for c in report.by_category.values())
    weighted = sum(c.loss * c.tokens for c in report.by_category.values()) / report.overall.tokens
    assert report.overall.loss == pytest.approx(weighted, rel=1e-9)
    for c in [report.overall, *report.by_category.values()]:
        assert c.perplexity == (math.exp(c.loss) if c.loss < 700 else math.inf)

    # A subset is a round-robin over categories, the same on every run.
    n = len(report.by_category)
    subset = heldout_loss(str(tiny_model), heldout, max_examples=n, progress=False)
    assert {c: v.examples for c, v in subset.by_category.items()} == dict.fromkeys(report.by_category, 1)
    assert subset == heldout_loss(str(tiny_model), heldout, max_examples=n, progress=False)
    # Batching changes only float rounding: right padding is invisible under the causal mask.
    alone = heldout_loss(str(tiny_model), heldout, max_examples=n, batch_size=1, progress=False)
    assert alone.overall.loss == pytest.approx(subset.overall.loss, rel=1e-5)


@pytest.mark.timeout(120)
def test_shards_of_another_tokenizer_are_refused_naming_both(tmp_path, tokenizer_path, heldout):
    other = AutoTokenizer.from_pretrained(tokenizer_path)  # not load_tokenizer's: that one is cached and shared
    other.add_tokens(["<an extra token>"])
    other.save_pretrained(tmp_path / "other-model")  # no weights: the check must come before they are needed
    with pytest.raises(UserError) as refused:
        heldout_loss(str(tmp_path / "other-model"), heldout, progress=False)
    message = str(refused.value)
    assert tokenizer_path in message and str(tmp_path / "other-model") in message
    assert "--tokenizer" in message and "dolly data prepare" in message


@pytest.mark.timeout(300)
def test_scoring_hashes_the_shards_once_and_not_again_when_handed_them_verified(
    monkeypatch, tmp_path, tokenizer_path, tiny_model, heldout
):
    from pipelines import manifest
    from pipelines.behaviour import BehaviourConfig
    from pipelines.evaluate import score_model

    hashed = []
    real = manifest.shard_hashes
    monkeypatch.setattr(manifest, "shard_hashes", lambda folder: hashed.append(folder) or real(folder))
    behaviour = BehaviourConfig(modes=["greedy"], examples=2, decoding=Decoding(max_tokens=4))
    from_folder, _ = score_model(str(tiny_model), heldout, behaviour, max_examples=4)
    assert len(hashed) == 1, "loss and answers read shards verified once"
    data = manifest.verified(heldout)
    hashed.clear()
    from_verified, _ = score_model(str(tiny_model), data, behaviour, max_examples=4)
    assert hashed == [] and from_verified == from_folder
    other = AutoTokenizer.from_pretrained(tokenizer_path)
    other.add_tokens(["<an extra token>"])
    other.save_pretrained(tmp_path / "other-model")
    with pytest.raises(UserError, match="dolly data prepare"):  # verified shards still refuse a foreign tokenizer
        heldout_loss(str(tmp_path / "other-model"), data, progress=False)


def constant_model(folder: Path, tiny_model: Path, p_end: float) -> tuple[Path, str]:
    """A model whose next token is " Hello" with probability 1 - p_end and `### End` otherwise,
    whatever came before: its final layer norm outputs a constant, so the logits are constant."""
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), tokenizer, dtype=torch.float32)
    hello, end = tokenizer(" Hello", add_special_tokens=False)["input_ids"][0], tokenizer.convert_tokens_to_ids(END_KEY)
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0
        head = model.get_output_embeddings().weight
        head[:, 0] = -30.0
        head[hello, 0], head[end, 0] = math.log(1 - p_end), math.log(p_end)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, "Hello"


@pytest.mark.timeout(180)
def test_samples_are_seeded_and_end_at_the_end_token(tmp_path, tiny_model, slice_records):
    folder, word = constant_model(tmp_path / "hello", tiny_model, p_end=0.3)
    lm = LoadedModel(str(folder))

    def run(seed: int):
        return sample_generations(lm, slice_records, per_category=1, decoding=Decoding(max_tokens=64), seed=seed)

    first = run(seed=3)
    assert [s.category for s in first] == list(DOLLY_CATEGORIES)  # one per category, in Dolly's order
    assert first == run(seed=3)
    for sample in first:
        assert sample.finish == "stop" and set(sample.generated.split()) <= {word}
        assert "###" not in sample.generated
    # Sampled, not greedy: answer lengths vary with the seed.
    assert len({len(run(seed=s)[0].generated) for s in range(6)}) > 1
    # Greedy never picks `### End` here (p 0.3): the answer runs to the token budget.
    greedy = sample_generations(lm, slice_records[:1], decoding=Decoding(max_tokens=5, temperature=0))
    assert greedy[0].finish == "length" and greedy[0].generated == " ".join([word] * 5)


@pytest.mark.timeout(300)
def test_dolly_eval_end_to_end_against_a_base(tmp_path, tokenizer_path, tiny_model, heldout, slice_records):
    root = tmp_path / "registry"
    registry.register(tiny_model, "dolly", root)
    base = export_tiny_model(tmp_path / "base", tokenizer_path, seed=1)
    app = Typer()
    app.command()(eval_command)
    result = CliRunner().invoke(
        app,
        [
            "--model",
            "dolly@latest",
            "--base",
            str(base),
            "--data-dir",
            str(heldout),
            "--out",
            str(tmp_path / "eval"),
            "--samples-per-category",
            "1",
            f"registry={root}",
            "decoding.max_tokens=8",
            "decoding.temperature=0",
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "eval" / "dolly@1"
    assert "overall" in result.output and str(out / "report.json") in result.output.replace("\n", "")

    saved = json.loads((out / "report.json").read_text())
    assert [loss["model"] for loss in saved["losses"]] == ["base", "dolly@1"]
    assert saved["losses"][1]["overall"]["examples"] == TEST_SIZE
    assert (out / "loss_by_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    categories = set(read_manifest(heldout)["splits"]["test"]["by_category"])
    assert len(samples) == 2 * len(categories) and {s["category"] for s in samples} == categories
    # The prompts were decoded back from the shards: each is one of the corpus records.
    originals = {(r["instruction"], r["context"], r["response"]) for r in slice_records}
    assert all((s["instruction"], s["context"], s["reference"]) in originals for s in samples)
    assert (out / "samples.md").exists()
    # Behaviour: both models answered the held-out instructions greedy and sampled, side by side.
    assert [(b["model"], b["mode"]) for b in saved["behaviour"]] == [
        ("base", "greedy"),
        ("base", "sampled"),
        ("dolly@1", "greedy"),
        ("dolly@1", "sampled"),
    ]
    assert all(b["overall"]["examples"] == TEST_SIZE for b in saved["behaviour"])
    assert "Behaviour on held-out instructions (greedy" in result.output
    assert (out / "behaviour_by_category.png").read_bytes()[:4] == b"\x89PNG"
    greedy = [json.loads(line) for line in (out / "answers-greedy.jsonl").read_text().splitlines()]
    assert len(greedy) == 2 * TEST_SIZE and {a["model"] for a in greedy} == {"base", "dolly@1"}


@pytest.mark.timeout(300)
def test_dolly_eval_feedback_tells_the_mistakes_a_model_still_makes_from_those_it_no_longer_makes(tmp_path, tiny_model, heldout):
    # Two corrections held out: of an answer the model still gives (its own greedy answer), and
    # of one it does not give, corrected to what it now says.
    lm = LoadedModel(str(tiny_model))
    asked = [
        {"instruction": "Who wrote Hamlet?", "context": "A play of 1600.", "category": "closed_qa", "response": "-"},
        {"instruction": "Name a colour.", "context": "", "category": "open_qa", "response": "-"},
    ]
    says = [
        s.generated
        for s in answer(lm, [record_prompt(r, lm.tokenizer) for r in asked], SamplingParams(temperature=0.0, max_tokens=16), 0, 2)
    ]
    db = f"sqlite:///{tmp_path / 'feedback.db'}"
    store = FeedbackStore(db)
    still = store.add(**{**asked[0], "response": "William Shakespeare."}, model="dolly@1", answer=says[0])
    fixed = store.add(**{**asked[1], "response": says[1]}, model="dolly@1", answer="Cats are the best colour.")
    store.review("held_out")

    app = Typer()
    app.command()(eval_command)
    flags = [
        "--model",
        str(tiny_model),
        "--data-dir",
        str(heldout),
        "--out",
        str(tmp_path / "eval"),
        "--samples-per-category",
        "0",
    ]
    settings = ["behaviour.modes=[greedy]", "behaviour.examples=2", "behaviour.decoding.max_tokens=16"]
    result = CliRunner().invoke(app, [*flags, "--feedback", db, *settings])
    assert result.exit_code == 0, result.output
    assert "Flagged mistakes: 2 held-out corrections" in result.output
    out = tmp_path / "eval" / tiny_model.name
    flagged = json.loads((out / "report.json").read_text())["flagged"]
    assert [(f["records"], f["scored"], f["paired"], f["prefers_correction"], f["repeats_mistake"]) for f in flagged] == [
        (2, 2, 2, 1, 1)
    ]
    answers = {a["id"]: a for a in map(json.loads, (out / "flagged-answers.jsonl").read_text().splitlines())}
    assert answers[still]["repeats_mistake"] and answers[still]["generated"] == says[0]
    assert answers[still]["flagged_loss"] < answers[still]["correction_loss"]
    assert not answers[fixed]["repeats_mistake"] and answers[fixed]["generated"] == says[1]
    assert answers[fixed]["correction_loss"] < answers[fixed]["flagged_loss"]

    nothing = CliRunner().invoke(app, [*flags, "--feedback", f"sqlite:///{tmp_path / 'empty.db'}", *settings])
    assert isinstance(nothing.exception, UserError) and "dolly feedback hold-out" in str(nothing.exception)


@pytest.mark.timeout(60)
def test_comparison_table_and_plot(tmp_path, report):
    tuned = report.model_copy(update={"model": "tuned", "overall": report.overall.model_copy(update={"loss": 1.0})})
    table = compare(report, tuned)
    assert [c.header for c in table.columns][:5] == ["category", "examples", "base loss", "tuned loss", "Δ loss"]
    assert table.row_count == len(report.by_category) + 1
    path = plot_comparison([report, tuned], tmp_path / "plot.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.timeout(30)
def test_the_published_table_is_transcribed_consistently_and_shown_beside_ours():
    for name, (*scores, gmean) in PUBLISHED_DOLLY_V2.items():
        assert len(scores) == len(DOLLY_V2_TASKS)
        assert math.prod(scores) ** (1 / len(scores)) == pytest.approx(gmean, abs=2e-6), name
    ours = HarnessReport(
        model="dolly@1",
        gmean=0.5,
        scores={t: TaskScore(metric="acc", value=0.5, stderr=None, examples=9) for t in DOLLY_V2_TASKS},
    )
    table = harness_table([ours])
    assert table.row_count == len(PUBLISHED_DOLLY_V2) + 1
    assert [c.header for c in table.columns] == ["model", *DOLLY_V2_TASKS, "gmean"]


def write_choice_task(folder: Path, docs: list[dict]) -> Path:
    """An lm-eval multiple-choice task over a local JSON-lines file."""
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_choice.yaml").write_text(f"""task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "docs.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.mark.timeout(180)
def test_harness_scores_a_local_task_with_our_model(tmp_path, tiny_model):
    pytest.importorskip("lm_eval")
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model), tokenizer, dtype=torch.float32).eval()
    questions = [
        "What colour is the sky?",
        "How many legs has a cat?",
        "Which is a fruit?",
        "Where is Paris?",
        "What do bees make?",
        "Which is a planet?",
        "What is ice?",
        "Who wrote Hamlet?",
    ]
    choices = ["blue", "four legs", "an apple", "in France", "honey", "Mars", "frozen water", "Shakespeare"]

    def loglikelihood(context: str, continuation: str) -> float:
        # As lm-eval scores a choice: the pair tokenized together, the continuation's tokens summed.
        n_context = len(tokenizer(context)["input_ids"])
        ids = torch.tensor([tokenizer(context + continuation)["input_ids"]])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        return sum(logprobs[i - 1, ids[0, i]].item() for i in range(n_context, ids.shape[1]))

    docs = []
    for i, question in enumerate(questions):
        options = [choices[(i + k) % len(choices)] for k in range(4)]
        scores = [loglikelihood(f"Question: {question}\nAnswer:", f" {o}") / len(o) for o in options]
        # The gold answer is the one acc_norm picks under this model: only scoring with it gives 1.0.
        docs.append({"question": question, "choices": options, "answer": scores.index(max(scores))})
    result = lm_eval_harness(str(tiny_model), ["tiny_choice"], include_path=write_choice_task(tmp_path / "tasks", docs))
    score = result.scores["tiny_choice"]
    assert (score.metric, score.value, score.examples) == ("acc_norm", 1.0, len(docs))
    assert result.model == tiny_model.name and result.gmean == 1.0


@pytest.mark.timeout(120)
def test_harness_says_clearly_when_the_task_datasets_are_unreachable(monkeypatch, tiny_model):
    pytest.importorskip("lm_eval")
    import datasets.config
    import huggingface_hub.constants

    # The Hub is unreachable here either way; offline mode makes that immediate instead of retried.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"could not be reached.*Hugging Face Hub.*where huggingface\.co is reachable"):
        lm_eval_harness(str(tiny_model), DOLLY_V2_TASKS)


@pytest.mark.timeout(60)
def test_harness_without_lm_eval_says_how_to_install_it(monkeypatch, tiny_model):
    for name in ["lm_eval", *(m for m in sys.modules if m.startswith("lm_eval."))]:
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without it sees on import
    with pytest.raises(UserError, match=re.escape("pip install 'lm_eval==")):
        lm_eval_harness(str(tiny_model))
