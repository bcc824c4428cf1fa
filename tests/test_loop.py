"""The closed loop, end to end with a tiny model: `dolly up` (data -> train -> evaluate -> export ->
register -> serve) answers through the official OpenAI client; `dolly retrain` on more records
is held back by a gate it cannot pass, then promoted and swapped into the running app in place."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from contract import generation
from contract.decoding import Decoding
from loop.configs import GateConfig
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def loop(tmp_path_factory, corpus_path, tokenizer_path, ray_cluster):
    """`dolly up` on a 12-record slice of the corpus (serving left running), and 6 new records."""
    from ray import serve

    from loop.configs import UpConfig
    from loop.up import up

    folder = tmp_path_factory.mktemp("loop")
    records = [json.loads(line) for line in corpus_path.open()]
    short = [r for r in records if len(r["instruction"]) + len(r["context"]) + len(r["response"]) < 200]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[:12]))
    (folder / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short[12:18]))
    config = UpConfig(
        data=str(folder / "corpus.jsonl"),
        base_model="pythia-14m-random",
        tokenizer=tokenizer_path,
        workdir=folder / "up",
        registry=folder / "registry",
        train=dict(max_steps=1, lr=1e-6, num_workers=1, prepare=dict(max_length=128, test_size=3)),
        eval_examples=None,
        port=free_port(),
        open_browser=False,
    )
    try:
        urls = up(config, block=False)
        yield folder, config, urls
    finally:
        serve.shutdown()


def client(urls) -> openai.OpenAI:
    key = Path(urls["api_key_file"]).read_text().strip()
    return openai.OpenAI(base_url=urls["api"], api_key=key, max_retries=0, timeout=60)


def retrain_config(folder, config, **gate):
    from cli.configs import load_config
    from loop.configs import RetrainConfig

    # What `dolly up` printed to run, with a training run that clearly learns more than up's one step.
    return load_config(
        RetrainConfig,
        config.workdir / "retrain.yaml",
        {"new_records": [str(folder / "new.jsonl")]},
        ["train.max_steps=8", "train.lr=1e-3", *(f"gate.{k}={v}" for k, v in gate.items())],
    )


def test_up_serves_its_registered_model_through_the_openai_client_and_the_page(loop):
    folder, config, urls = loop
    assert urls["model"] == "dolly@1" and (config.registry / "dolly" / "LATEST").read_text().strip() == "1"
    answer = client(urls).chat.completions.create(model="dolly", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert answer.model == "dolly@1" and answer.usage.completion_tokens >= 1
    # The model carries the decoding its answers were scored with; the API serves it by default and says so.
    carried = Decoding.of_model(config.registry / "dolly" / "1")
    scored = json.loads((config.workdir / "report.json").read_text())["tuned"]["behaviour"]
    assert carried in [Decoding(**r["decoding"]).model_copy(update={"max_tokens": generation.MAX_NEW_TOKENS}) for r in scored]
    assert client(urls).models.list().data[0].model_extra["decoding"] == carried.model_dump()
    assert httpx.get(urls["page"], timeout=60).status_code == 200
    assert (config.workdir / "loss_by_category.png").stat().st_size > 0


def test_a_second_up_reuses_every_stage(loop, capsys, monkeypatch):
    from loop.up import up

    folder, config, urls = loop
    monkeypatch.setenv("COLUMNS", "300")  # one line per message
    again = up(config, block=False)
    out = capsys.readouterr().out
    assert "already holds this exact preparation" in out and out.count("Reusing the score of") == 2
    assert "Reusing run up-" in out and again["model"] == "dolly@1", "no second training run, no second version"


def test_a_retrain_on_approved_feedback_that_misses_the_gate_is_registered_but_neither_promoted_nor_served(loop):
    from contract.feedback import FeedbackStore
    from loop.retrain import retrain

    folder, config, urls = loop
    # A person rates an answer down and writes a better one; a curator approves it.
    key = Path(urls["api_key_file"]).read_text().strip()
    written = {"response": "Red, yellow and blue.", "category": "open_qa"}
    body = {"model": "dolly@1", "instruction": "Name three primary colours.", "rating": "down", "correction": written}
    sent = httpx.post(f"{urls['api']}/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert sent.status_code == 201, sent.text
    FeedbackStore(urls["feedback"]).review("approved")

    report = retrain(retrain_config(folder, config, min_improvement=1000))
    assert report.feedback_records == 1, "the approved answer went into the candidate's data"
    assert json.loads((config.workdir / "retrain" / "report.json").read_text())["feedback_records"] == 1
    assert report.candidate == "dolly@2" and not report.promoted and not report.swapped
    assert "had to be below" in report.decision.reason and report.decision.decided_by == "loss"
    assert (config.registry / "dolly" / "LATEST").read_text().strip() == "1"
    assert client(urls).models.list().data[0].model_extra["version"] == "dolly@1"


def test_a_better_retrain_is_promoted_and_swapped_into_the_running_app(loop):
    from loop.retrain import retrain

    folder, config, urls = loop
    report = retrain(retrain_config(folder, config))  # same data and settings: the finished run is reused
    decision = report.decision
    assert report.candidate == "dolly@2" and report.promoted and report.swapped
    assert decision.candidate < decision.serving, "the gate compared both on the same held-out split"
    assert report.scores["candidate"].overall.examples == report.scores["serving"].overall.examples
    assert decision.decided_by == "every rule" and [r.name for r in decision.rules] == [
        "loss",
        "stop rate",
        "repetition",
        "ROUGE-L",
    ]
    greedy = {side: next(b for b in report.behaviour[side] if b.mode == "greedy") for side in ("serving", "candidate")}
    assert greedy["serving"].overall.examples == greedy["candidate"].overall.examples >= 1
    assert (config.registry / "dolly" / "LATEST").read_text().strip() == "2"
    api = client(urls)
    assert api.models.list().data[0].model_extra["version"] == "dolly@2"
    assert (
        api.chat.completions.create(model="dolly", messages=[{"role": "user", "content": "Hi"}], max_tokens=4).model == "dolly@2"
    )


def test_up_again_after_a_promotion_keeps_serving_the_promoted_version(loop, capsys, monkeypatch):
    from loop.up import up

    folder, config, urls = loop
    monkeypatch.setenv("COLUMNS", "300")
    assert up(config, block=False)["model"] == "dolly@2"
    assert "Already registered as dolly@1" in capsys.readouterr().out
    assert (config.registry / "dolly" / "LATEST").read_text().strip() == "2"


# The loss rule alone (behaviour=False); the behaviour rules are specified in tests/test_behaviour.py.
@pytest.mark.parametrize(
    ("gate", "serving", "candidate", "promote"),
    [
        (GateConfig(behaviour=False), 2.0, 1.9, True),
        (GateConfig(behaviour=False), 2.0, 2.0, False),  # equal is not better
        (GateConfig(behaviour=False, min_improvement=0.2), 2.0, 1.9, False),
        (GateConfig(behaviour=False, min_improvement=0.04, relative=True), 2.0, 1.9, True),
        (GateConfig(behaviour=False, min_improvement=0.06, relative=True), 2.0, 1.9, False),
    ],
)
def test_the_gate_wants_lower_by_more_than_the_margin(gate, serving, candidate, promote):
    from loop.gate import gate as judge
    from pipelines.loss import CategoryLoss, LossReport

    def report(loss):
        scores = CategoryLoss(examples=1, tokens=1, loss=loss, perplexity=2.718**loss)
        return LossReport(model="m", overall=scores, by_category={"closed_qa": scores})

    assert judge(gate, report(serving), report(candidate)).promote is promote


def test_a_gate_on_a_category_without_examples_names_the_ones_there_are():
    from contract.errors import UserError
    from loop.gate import gate as judge
    from pipelines.loss import CategoryLoss, LossReport

    scores = CategoryLoss(examples=1, tokens=1, loss=1.0, perplexity=2.7)
    report = LossReport(model="m", overall=scores, by_category={"closed_qa": scores})
    with pytest.raises(UserError, match="closed_qa"):
        judge(GateConfig(category="summarization"), report, report)


def test_up_with_method_lora_trains_adapters_at_loras_learning_rate(tmp_path):
    from loop.configs import UpConfig
    from pipelines.configs import LORA_LR

    config = UpConfig(train={"method": "lora", "lora": {"r": 8}}).train_config(tmp_path / "data")
    assert (config.method, config.lora.r, config.lr) == ("lora", 8, LORA_LR)
    assert UpConfig(train={"method": "lora", "lr": 1e-3}).train_config(tmp_path / "data").lr == 1e-3


def test_up_trains_its_train_settings_over_the_presets_demo_and_refuses_the_ones_it_sets_itself(tmp_path):
    from loop.configs import UpConfig
    from pipelines.presets import PRESETS

    demo = PRESETS["cpu"].demo
    config = UpConfig(train={"max_steps": 60, "prepare": {"test_size": 100}}).train_config(tmp_path / "data")
    assert (config.max_steps, config.lr, config.prepare.test_size) == (60, demo["lr"], 100)
    assert (config.prepare.pack, config.prepare.max_length) == (demo["prepare"]["pack"], demo["prepare"]["max_length"])
    # The corpus's own held-out size (the built-in sample's) lies under what the user sets.
    assert UpConfig().train_config(tmp_path, test_size=8).prepare.test_size == 8
    assert UpConfig(train={"prepare": {"test_size": 5}}).train_config(tmp_path, test_size=8).prepare.test_size == 5
    # A decoding given in part keeps the rest of dolly up's: Dolly's temperature, with its budget and penalties.
    dolly = UpConfig(behaviour={"decoding": {"temperature": 1}}).behaviour.decoding
    assert (dolly.temperature, dolly.max_tokens) == (1, UpConfig().behaviour.decoding.max_tokens)
    assert (dolly.frequency_penalty, dolly.presence_penalty) == (0.3, 0.6)
    with pytest.raises(ValueError, match=r"train.base_model is set by `dolly up` from its own setting base_model"):
        UpConfig(train={"base_model": "EleutherAI/pythia-70m"})
    with pytest.raises(ValueError, match=r"train.max_steps: Input should be greater than or equal to 1"):
        UpConfig(train={"max_steps": 0})


@pytest.mark.timeout(60)
def test_dolly_up_serves_the_measured_decoding_whose_answers_end_most_without_looping():
    from contract.decoding import Decoding
    from loop.configs import UpConfig
    from loop.up import serving_decoding
    from pipelines.behaviour import Sample, summarize

    def report(mode, finishes: str, loops: int = 0):
        decoding = UpConfig().behaviour.decoding_for(mode)
        answers = [
            Sample(model="m", category="open_qa", instruction="i", context="", reference="Paris.", generated=text, finish=f)
            for f, text in zip(["stop" if c == "s" else "length" for c in finishes], ["a b c d " * 4] * loops + ["Paris."] * 9)
        ]
        return summarize(answers, mode, decoding)

    # 9 of 10 greedy answers end, one loops (0.8); 7 of 10 sampled ones end, none loops (0.7).
    greedy, sampled = report("greedy", "sssssssssl", loops=1), report("sampled", "sssssssll" + "l")
    chosen, why = serving_decoding(UpConfig(), [greedy, sampled])
    assert chosen == Decoding(temperature=0, frequency_penalty=0.3, presence_penalty=0.6)
    assert "greedy answers end 90%, loop 10%" in why
    tie = report("sampled", "sssssssssl", loops=1)
    assert serving_decoding(UpConfig(), [greedy, tie])[0].temperature == 0.7, "a tie goes to sampling"
    asked = UpConfig(serve_decoding="sampled")
    assert serving_decoding(asked, [greedy, sampled])[0] == asked.behaviour.decoding.model_copy(update={"max_tokens": 256})
