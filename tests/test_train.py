"""Fine-tuning as a user runs it: two CPU workers with real DeepSpeed ZeRO overfit a small slice
of the corpus, and the export is a plain Hugging Face folder that generates and stops at `### End`."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from contract import END_KEY, extract_response
from pipelines.configs import TrainConfig
from pipelines.metrics import read_history
from pipelines.train import train
from tests.conftest import prepared

# A hang guard, not a speed target: the first test here pays for the module's training run and,
# on a fresh clone, for DeepSpeed's one-off JIT build of its comm op.
pytestmark = pytest.mark.timeout(600)


def overfit_config(tmp_path, data_dir, tokenizer_path, **settings) -> TrainConfig:
    """A tiny random Pythia, a high constant learning rate, two workers of two rows each."""
    return TrainConfig.model_validate(
        {
            "base_model": "pythia-14m-random",
            "tokenizer": tokenizer_path,
            "data_dir": str(data_dir),
            "num_workers": 2,
            "micro_batch_size": 2,
            "precision": "fp32",
            "lr": 3e-3,
            "warmup_steps": 3,
            "decay": "constant",
            "max_steps": 40,
            "log_every": 5,
            "eval_every": 20,
            "checkpoint_every": 40,
            "storage_path": str(tmp_path / "storage"),
            "output_dir": str(tmp_path / "out"),
            "registry": str(tmp_path / "registry"),
            "run_name": "overfit",
            "mlflow": True,
            "mlflow_tracking_uri": f"file:{tmp_path / 'mlruns'}",
            **settings,
        }
    )


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def overfit_run(request, tmp_path_factory, train_data, tokenizer_path):
    config = overfit_config(tmp_path_factory.mktemp(f"zero{request.param}"), train_data, tokenizer_path, zero_stage=request.param)
    # What a person would read: a console as a pipe gives it (plain lines, the bar's last state).
    console = Console(record=True, file=io.StringIO(), width=200)
    result = train(config, console)
    return config, result, console.export_text()


def test_two_workers_overfit_a_small_slice(overfit_run):
    config, result, _ = overfit_run
    history = read_history(config.output_dir / config.run_name)
    losses = [row["train_loss"] for row in history if "train_loss" in row]
    assert losses[0] > 9.0, "a random model starts near ln(vocabulary) ~ 10.8"
    assert losses[-1] < 1.0, f"ZeRO-{config.zero_stage} did not overfit: {losses}"
    assert result.metrics["step"] == config.max_steps
    assert result.metrics["tokens_per_s"] > 0 and "eval_loss" in result.metrics


def test_export_loads_with_a_pipeline_and_generation_stops_at_end(overfit_run, train_data, tokenizer):
    import pyarrow.parquet as pq
    from transformers import pipeline

    config, result, _ = overfit_run
    generator = pipeline("text-generation", model=result.metrics["export_dir"])
    end_id = tokenizer.convert_tokens_to_ids(END_KEY)
    assert generator.model.generation_config.eos_token_id == end_id

    # The prompt of a training example: the overfit model answers it, then emits `### End`, and
    # generation stops there instead of running on to max_new_tokens.
    row = pq.read_table(train_data / "train").slice(0, 1).to_pylist()[0]
    prompt_length = next(i for i, label in enumerate(row["labels"]) if label != -100)
    prompt = tokenizer.decode(row["input_ids"][:prompt_length])
    out = generator(prompt, do_sample=False, max_new_tokens=64, return_tensors=True)[0]["generated_token_ids"]
    answer = out[prompt_length:]
    assert answer[-1] == end_id and len(answer) < 64, tokenizer.decode(answer)
    assert extract_response(tokenizer.decode(answer)), "an answer precedes `### End`"

    # As any chat server would: the export's chat template renders the same prompt, and the
    # answer comes back as the assistant's message, ended at `### End`.
    record = next(
        r for r in map(json.loads, (train_data.parent / "slice.jsonl").read_text().splitlines()) if r["instruction"] in prompt
    )
    messages = [{"role": "user", "content": record["instruction"]}]
    if record["context"]:
        messages.insert(0, {"role": "system", "content": record["context"]})
    assert generator.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    [reply] = generator(messages, do_sample=False, max_new_tokens=64)
    assert reply["generated_text"][-1]["role"] == "assistant"
    assert reply["generated_text"][-1]["content"].strip() == extract_response(tokenizer.decode(answer))


def test_export_carries_a_model_card_and_is_registered(overfit_run):
    from contract import registry

    config, result, _ = overfit_run
    assert result.metrics["registered"] == f"{config.register_as}@1"
    folder, _ = registry.resolve(f"{config.register_as}@latest", config.registry)
    facts = json.loads((folder / "training.json").read_text())
    assert facts["config"]["zero_stage"] == config.zero_stage and facts["metrics"]["step"] == config.max_steps
    card = (folder / "README.md").read_text()
    for fact in (config.base_model, facts["data"]["manifest_sha256"], "eval_loss", "micro_batch_size", "vllm serve"):
        assert fact in card


def test_metrics_reach_the_console_log_tensorboard_mlflow_and_a_loss_curve(overfit_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when told to
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, result, screen = overfit_run
    run_dir = config.output_dir / config.run_name
    logged = read_history(run_dir)
    assert [row["step"] for row in logged] == list(range(5, config.max_steps + 1, 5))
    for key in ("train_loss", "tokens_per_s", "memory_gib", "lr", "data_wait"):
        assert all(key in row for row in logged), key
    assert [row["step"] for row in logged if "eval_loss" in row] == [20, 40]

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train_loss", "eval_loss", "tokens_per_s", "memory_gib"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train_loss")] == [row["step"] for row in logged]

    client = MlflowClient(config.mlflow_tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name(config.run_name).experiment_id])
    assert run.data.params["zero_stage"] == str(config.zero_stage)
    assert run.data.metrics["train_loss"] == pytest.approx(logged[-1]["train_loss"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"loss_curve.png", "README.md"}

    # The screen: rank 0's rows reach the driver through Ray (the workers' own output stays in
    # Ray's log files), and one bar ends at the last step with the loss.
    assert [int(n) for n in re.findall(r"^step (\d+): train_loss", screen, re.M)] == [row["step"] for row in logged]
    assert re.search(rf"train .* {config.max_steps}/{config.max_steps} steps +loss [0-9.]+ +[0-9,]+ tokens/s", screen), screen

    curve = run_dir / "loss_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result.metrics["loss_curve"] == str(curve)


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory, tokenizer_path, ray_cluster):
    """Six records whose answers run from one word to a hundred: four to train on, two held out."""
    words = [1, 90, 3, 60, 2, 100]
    records = [
        {"instruction": f"Say something, take {i}.", "context": "", "response": " ".join(["blue"] * n), "category": "open_qa"}
        for i, n in enumerate(words)
    ]
    return prepared(tmp_path_factory.mktemp("uneven"), records, tokenizer_path, max_length=256, test_size=2)


def test_a_step_weighs_every_label_token_alike_across_micro_batches_and_workers(tmp_path, uneven_data, tokenizer_path):
    """The same four examples in one optimizer step: as 2 workers x 2 accumulated micro-batches of
    one, as one batch of four on one worker, and as that batch flattened into one row. A mean of per-micro-batch means would weigh a
    one-word answer like a hundred-word one; the mean over the step's tokens gives both the same
    loss and gradient."""
    common = dict(
        max_steps=1, warmup_steps=0, log_every=1, eval_every=1, checkpoint_every=1, mlflow=False, grad_clip=0.0, zero_stage=2
    )
    split = overfit_config(
        tmp_path / "split",
        uneven_data,
        tokenizer_path,
        num_workers=2,
        micro_batch_size=1,
        grad_accum=2,
        run_name="split",
        **common,
    )
    whole = overfit_config(
        tmp_path / "whole",
        uneven_data,
        tokenizer_path,
        num_workers=1,
        micro_batch_size=4,
        grad_accum=1,
        run_name="whole",
        **common,
    )
    flat = whole.model_copy(update={"padding_free": True, "run_name": "flat", "output_dir": tmp_path / "flat"})
    a, b, c = train(split).metrics, train(whole).metrics, train(flat).metrics
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3) and a["grad_norm"] > 0
    # padding_free: the four examples flattened into one row, no pad computed, the same step.
    assert c["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert c["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_training_on_cpu_builds_no_deepspeed_op_on_first_use(tmp_path, uneven_data, tokenizer_path, monkeypatch):
    """A newcomer's first run pays no JIT compile (DeepSpeed's shm all-reduce took ~3 min on 2 cores)."""
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))  # reaches the workers (train.WORKER_ENV)
    config = overfit_config(tmp_path, uneven_data, tokenizer_path, num_workers=2, max_steps=1, log_every=1, mlflow=False)
    assert train(config).metrics["step"] == 1
    built = sorted(p.name for p in extensions.rglob("*.so")) if extensions.exists() else []
    assert built == [], f"training on CPU JIT-built DeepSpeed ops: {built}"
