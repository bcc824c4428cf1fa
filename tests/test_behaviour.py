"""Behaviour, not only loss: the scores see an answer that loops, one that never stops and one that
copies the reference; Dolly's new tokens start from what the base knows; a short training run
teaches a tiny model to end its answers; the retrain gate refuses a lower loss that stops less."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from contract import END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL
from contract.decoding import Decoding
from contract.records import DOLLY_CATEGORIES
from loop.configs import GateConfig
from loop.gate import gate
from pipelines.behaviour import LOOP_THRESHOLD, BehaviourConfig, BehaviourReport, Sample, repetition, rouge_l, summarize
from pipelines.loss import CategoryLoss, LossReport

REFERENCE = "Paris is the capital of France, and it lies on the Seine."


def sample(generated: str, finish: str = "stop", category: str = "open_qa", reference: str = REFERENCE) -> Sample:
    return Sample(
        model="m",
        category=category,
        instruction="What is the capital of France?",
        context="",
        reference=reference,
        generated=generated,
        finish=finish,
    )


@pytest.mark.timeout(30)
def test_a_looping_answer_scores_high_repetition_and_a_fresh_one_none():
    loop = "Red, Blue, Green, Yellow, White, Black, Grey, White, " + "Red, Blue, Green, Yellow, " * 8
    assert repetition(loop) > 0.7 > LOOP_THRESHOLD
    assert repetition(REFERENCE) == 0.0
    assert repetition("Yes.") == 0.0, "too short for a 4-gram: nothing can repeat"
    report = summarize([sample(loop, "length"), sample(REFERENCE)], "greedy", Decoding(max_tokens=128).greedy())
    assert report.overall.loop_rate == 0.5
    assert report.overall.repetition == pytest.approx(repetition(loop) / 2)


@pytest.mark.timeout(30)
def test_an_answer_that_never_stops_lowers_the_stop_rate():
    report = summarize(
        [sample("Paris " * 128, "length"), sample("Paris.", "stop"), sample("Paris.", "stop"), sample("Paris.", "stop")],
        "greedy",
        Decoding(max_tokens=128).greedy(),
    )
    assert report.overall.stop_rate == 0.75 and report.overall.examples == 4


@pytest.mark.timeout(30)
def test_rouge_l_is_one_for_a_copy_of_the_reference_and_falls_with_what_is_missing():
    assert rouge_l(REFERENCE, REFERENCE) == pytest.approx(1.0)
    assert rouge_l("Paris.", REFERENCE) < rouge_l("Paris is the capital of France.", REFERENCE) < 1.0
    assert rouge_l("Bananas grow well.", REFERENCE) == 0.0


@pytest.mark.timeout(30)
def test_scores_are_per_category_in_dollys_order_and_reconcile_with_the_answers():
    answers = [sample(REFERENCE, category=c) for c in reversed(DOLLY_CATEGORIES)]
    answers.append(sample("Paris Paris Paris", "length", category="closed_qa", reference="Paris"))
    report = summarize(answers, "sampled", Decoding(max_tokens=64))
    assert list(report.by_category) == list(DOLLY_CATEGORIES)
    assert sum(c.examples for c in report.by_category.values()) == report.overall.examples == len(answers)
    closed = report.by_category["closed_qa"]
    assert closed.stop_rate == 0.5 and closed.words == (len(REFERENCE.split()) + 3) / 2
    assert report.by_category["open_qa"].length_ratio == 1.0
    with pytest.raises(ValueError, match="several models"):
        summarize([sample("a"), sample("b").model_copy(update={"model": "other"})], "greedy", Decoding(max_tokens=8).greedy())


# ---------------------------------------------------------------------------- the gate


def loss_report(loss: float) -> LossReport:
    scores = CategoryLoss(examples=8, tokens=80, loss=loss, perplexity=2.718**loss)
    return LossReport(model="m", overall=scores, by_category={"closed_qa": scores})


def behaviour_report(stop_rate: float, repetition: float = 0.05, rouge: float = 0.3) -> BehaviourReport:
    answers = [sample("x", "stop" if i < round(stop_rate * 20) else "length") for i in range(20)]
    report = summarize(answers, "greedy", Decoding(max_tokens=128).greedy())
    overall = report.overall.model_copy(update={"repetition": repetition, "rouge_l": rouge})
    return report.model_copy(update={"overall": overall})


@pytest.mark.timeout(30)
def test_the_gate_refuses_a_lower_loss_whose_answers_stop_less_and_says_which_rule_decided():
    decision = gate(GateConfig(), loss_report(2.0), loss_report(1.5), behaviour_report(0.9), behaviour_report(0.5))
    assert not decision.promote and decision.decided_by == "stop rate"
    assert "stop rate" in decision.reason and "regressed" in decision.reason
    assert [r.passed for r in decision.rules] == [True, False, True, True]
    assert decision.candidate < decision.serving, "the loss rule alone would have promoted it"


@pytest.mark.parametrize(
    ("candidate", "promote", "decided_by"),
    [
        (behaviour_report(0.86, 0.07, 0.29), True, "every rule"),  # within every margin
        (behaviour_report(0.9, 0.10, 0.3), False, "repetition"),
        (behaviour_report(0.9, 0.05, 0.2), False, "ROUGE-L"),
    ],
)
def test_the_gate_allows_behaviour_to_move_only_within_its_margins(candidate, promote, decided_by):
    decision = gate(GateConfig(), loss_report(2.0), loss_report(1.5), behaviour_report(0.9), candidate)
    assert (decision.promote, decision.decided_by) == (promote, decided_by)


@pytest.mark.timeout(30)
def test_a_loss_only_gate_needs_no_answers_and_a_behaviour_gate_refuses_to_guess_without_them():
    assert gate(GateConfig(behaviour=False), loss_report(2.0), loss_report(1.5)).promote
    with pytest.raises(ValueError, match="BehaviourReport"):
        gate(GateConfig(), loss_report(2.0), loss_report(1.5))


# ---------------------------------------------------------------------------- Dolly's new tokens


@pytest.mark.timeout(120)
def test_dollys_new_tokens_start_from_the_bases_eos_and_their_own_pieces(tmp_path, tokenizer):
    from contract.models import load_model

    torch.manual_seed(0)
    model = load_model("pythia-14m-random", tokenizer)  # untied input and output embeddings
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL)}
    pieces = tokenizer("### Instruction:", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(pieces) > 1 and ids[INSTRUCTION_KEY] not in pieces
    for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert torch.equal(table[ids[END_KEY]], table[tokenizer.eos_token_id])
        assert torch.allclose(table[ids[INSTRUCTION_KEY]], table[pieces].mean(0))
        assert not torch.allclose(table[ids[RESPONSE_KEY_NL]], table[ids[INSTRUCTION_KEY]])

    # A model tuned in Dolly's format keeps its trained rows when it is loaded again.
    with torch.no_grad():
        model.get_input_embeddings().weight[ids[END_KEY]] = 7.0
    model.save_pretrained(tmp_path / "tuned")
    tokenizer.save_pretrained(tmp_path / "tuned")
    again = load_model(str(tmp_path / "tuned"), tokenizer)
    assert torch.all(again.get_input_embeddings().weight[ids[END_KEY]] == 7.0)


# ---------------------------------------------------------------------------- training teaches stopping


def short_answer_corpus(path: Path, n: int = 64) -> Path:
    """Instructions whose answers are one short word: a model that learns the format ends at once."""
    words = ["apple", "river", "stone", "cloud", "green", "seven", "tiger", "piano"]
    rng = random.Random(0)
    records = [
        {
            "instruction": f"Say the word {word} and nothing else.",
            "context": "",
            "response": word.capitalize() + ".",
            "category": DOLLY_CATEGORIES[i % len(DOLLY_CATEGORIES)],
        }
        for i, word in enumerate(rng.choice(words) for _ in range(n))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.timeout(600)
def test_a_short_training_run_makes_a_tiny_model_end_its_answers(tmp_path, tokenizer_path, ray_cluster):
    from pipelines.answers import heldout_behaviour
    from pipelines.configs import PrepareConfig, TrainConfig
    from pipelines.prepare import prepare
    from pipelines.train import train

    data = tmp_path / "data"
    prepare(
        PrepareConfig(
            source=str(short_answer_corpus(tmp_path / "short.jsonl")),
            output_dir=data,
            tokenizer=tokenizer_path,
            max_length=64,
            test_size=8,
        )
    )
    config = TrainConfig(
        base_model="pythia-14m-random",
        tokenizer=tokenizer_path,
        data_dir=data,
        num_workers=1,
        cpus_per_worker=0.5,
        micro_batch_size=8,
        lr=3e-3,
        warmup_steps=3,
        decay="constant",
        max_steps=30,
        checkpoint_every=30,
        eval_every=30,
        storage_path=str(tmp_path / "storage"),
        output_dir=tmp_path / "out",
        registry=tmp_path / "registry",
        register_as=None,
        run_name="stops",
    )
    export = train(config).metrics["export_dir"]

    budget = BehaviourConfig(modes=["greedy"], examples=8, decoding=Decoding(max_tokens=16))
    untrained, _ = heldout_behaviour("pythia-14m-random", data, budget, "greedy", tokenizer=tokenizer_path)
    tuned, answers = heldout_behaviour(export, data, budget, "greedy")
    assert untrained.overall.stop_rate <= 0.25, "a random model should rarely end by chance"
    assert tuned.overall.stop_rate >= 0.75, [a.generated for a in answers]
    assert tuned.overall.length_ratio <= 2 < untrained.overall.length_ratio, "short answers, as in the corpus"
