"""LoRA as a user runs it: `method=lora` trains PEFT adapters and Dolly's new token rows (where
they are new) on a frozen base, through the same Ray Train + DeepSpeed path as full fine-tuning
(two workers, ZeRO-2, verified checkpoints, resume), and exports an adapter that names its base,
plus a merged plain folder on request; loaded again, both compute what training computed.

(A random base learns slowly through adapters alone: its frozen output layer points nowhere in
particular. These tests check that the path is right, not how fast LoRA learns: that is for a
real base, in bench/.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract.models import load_model, load_tokenizer, special_token_ids
from pipelines.batches import collate
from pipelines.metrics import read_history
from pipelines.train import train
from tests.test_train import overfit_config

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, tokenizer_path):
    """A saved random pythia-14m: a base that the export can name and serving load again, with
    its own tokenizer (Dolly's tokens are new to it)."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    load_model("pythia-14m-random", load_tokenizer(tokenizer_path)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, train_data, tokenizer_path, base_folder):
    config = overfit_config(
        tmp_path_factory.mktemp("lora"),
        train_data,
        tokenizer_path,
        base_model=str(base_folder),
        method="lora",
        lora={"r": 16, "alpha": 32, "dropout": 0.0, "merged_export": True},
        lr=1e-2,
        zero_stage=2,  # ZeRO-3 needs GPUs here: PEFT gathers the token rows under ZeRO-3 on CUDA only
        max_steps=40,
        mlflow=False,
    )
    return config, train(config)


def test_lora_trains_the_adapter_and_the_new_token_rows_only(lora_run, base_folder, tokenizer):
    config, result = lora_run
    losses = [row["train_loss"] for row in read_history(config.output_dir / config.run_name) if "train_loss" in row]
    assert losses[-1] < losses[0] - 1.0, f"the adapter did not learn: {losses}"

    export = Path(result.metrics["export_dir"])
    adapter = json.loads((export / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base_folder) and adapter["peft_type"] == "LORA"
    with safe_open(str(export / "adapter_model.safetensors"), "pt") as weights:
        tensors = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 (safe_open has no iterator)
    assert all("lora_" in n or "trainable_tokens" in n for n in tensors), list(tensors)
    assert not list(export.glob("model*.safetensors")), "the adapter folder holds no base weights"

    # Dolly's new tokens learned: their trained input rows moved away from the base's.
    [rows] = [t for n, t in tensors.items() if "embed_in" in n and "trainable_tokens" in n]
    base = load_model(str(base_folder), tokenizer).get_input_embeddings().weight
    ids = sorted(special_token_ids(tokenizer).values())
    assert rows.shape == (len(ids), base.shape[1])
    assert not torch.allclose(rows.float(), base[ids].detach(), atol=1e-3)


def test_on_a_base_tuned_in_dollys_format_lora_trains_the_adapter_alone(tmp_path, train_data, tokenizer_path, tiny_model):
    """A tuned export (its tokenizer has Dolly's tokens, their rows trained) keeps its rows: the
    adapter holds LoRA weights only, the kind vLLM's LoRA serves (tests/test_serve_vllm.py)."""
    config = overfit_config(
        tmp_path,
        train_data,
        tokenizer_path,
        base_model=str(tiny_model),
        method="lora",
        num_workers=1,
        max_steps=2,
        eval_every=2,
        checkpoint_every=2,
        mlflow=False,
    )
    export = Path(train(config).metrics["export_dir"])
    assert json.loads((export / "adapter_config.json").read_text())["trainable_token_indices"] is None
    with safe_open(str(export / "adapter_model.safetensors"), "pt") as weights:
        assert weights.keys() and all("lora_" in name for name in weights.keys())  # noqa: SIM118


def test_the_adapter_on_its_base_and_the_merged_export_score_what_training_scored(lora_run, train_data, tokenizer):
    """Loaded as serving and evaluation load it (on its base, merged), the adapter scores the
    held-out split as the run's last evaluation did; the merged plain folder computes the same."""
    config, result = lora_run
    rows = pq.read_table(train_data / "test").to_pydict()
    batch = collate(
        {name: np.array([np.array(r) for r in rows[name]], dtype=object) for name in ("input_ids", "labels")},
        tokenizer.pad_token_id,
    )
    batch.pop("n_tokens")

    with torch.no_grad():
        adapted = load_model(result.metrics["export_dir"], tokenizer).eval()
        merged = AutoModelForCausalLM.from_pretrained(result.metrics["merged_dir"]).eval()
        loss = adapted(**batch, use_cache=False).loss.item()
        # The export is bf16: hence the tolerance.
        assert loss == pytest.approx(result.metrics["eval_loss"], rel=2e-2)
        assert merged(**batch, use_cache=False).loss.item() == pytest.approx(loss, rel=1e-2)
    assert (Path(result.metrics["merged_dir"]) / "config.json").is_file()


def test_a_lora_run_resumes_from_its_verified_checkpoint(lora_run, tmp_path):
    config, _ = lora_run
    rerun = config.model_copy(update={"max_steps": 42, "output_dir": tmp_path / "out", "register_as": None})
    result = train(rerun)
    assert result.metrics["resumes"][-1]["step"] == 40 and result.metrics["step"] == 42


def test_qlora_trains_the_adapters_on_a_4_bit_base(lora_run, tmp_path, tokenizer):
    """lora.quantize=4bit (bitsandbytes, whose 4-bit layers run on this CPU): the same run on the
    base held in NF4 starts from nearly, not exactly, the same loss (all else is the LoRA run's),
    learns, and its adapter loads on the full-precision base as any adapter does."""
    config, lora = lora_run
    qlora = config.model_copy(
        update={
            "lora": config.lora.model_copy(update={"quantize": "4bit", "merged_export": False}),
            "max_steps": 10,  # logged every 5 steps, as the LoRA run: the first windows see the same rows
            "run_name": "qlora",
            "output_dir": tmp_path / "out",
            "register_as": None,
        }
    )
    result = train(qlora)
    first = {c.run_name: read_history(c.output_dir / c.run_name)[0]["train_loss"] for c in (config, qlora)}
    assert first["qlora"] != pytest.approx(first[config.run_name], rel=1e-4), "the base was not quantized"
    assert first["qlora"] == pytest.approx(first[config.run_name], rel=0.05)
    losses = [row["train_loss"] for row in read_history(qlora.output_dir / qlora.run_name) if "train_loss" in row]
    assert losses[-1] < losses[0]
    assert load_model(result.metrics["export_dir"], tokenizer).config.vocab_size > 0
