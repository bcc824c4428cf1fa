"""The memory preflight refuses a plan that cannot fit before any worker starts, says by how much,
and names a change that fits; presets fill in what a config leaves unset."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.configs import TrainConfig
from pipelines.deepspeed_config import deepspeed_config
from pipelines.preflight import ModelShape, PlanDoesNotFit, check, estimate

pytestmark = pytest.mark.timeout(60)
SEQ = 2048


@pytest.fixture(scope="module")
def pythia_12b() -> ModelShape:
    return ModelShape.of("pythia-12b-random")


def plan(**settings) -> TrainConfig:
    return TrainConfig.model_validate({"base_model": "pythia-12b-random", "tokenizer": "unused", **settings})


def test_shapes_are_counted_from_config_without_allocating(pythia_12b):
    assert ModelShape.of("pythia-14m-random").n_params == 14_067_712  # pythia-14m's published count
    assert 11.8e9 < pythia_12b.n_params < 11.9e9


def test_full_fine_tune_of_12b_on_one_24gb_gpu_is_refused_with_the_estimate_and_a_fix(pythia_12b):
    config = plan(preset="a10", num_workers=1, host_memory_gib=256)
    with pytest.raises(PlanDoesNotFit) as refused:
        check(config, pythia_12b, SEQ)
    message = str(refused.value)
    assert "per device:" in message and "of 24" in message and "parameters 22.1" in message
    assert "suggestion:" in message and "offload_params=true" in message
    suggested = plan(preset="a10", num_workers=1, host_memory_gib=256, offload_params=True)
    assert estimate(suggested, pythia_12b, SEQ).fits, "the suggestion must itself fit"


def test_when_no_setting_fits_one_device_the_suggestion_is_more_devices(pythia_12b):
    # The A10 node's 192 GiB of host memory cannot hold a full offload of 12b either.
    with pytest.raises(PlanDoesNotFit, match=r"suggestion: more devices: .*num_workers=\d+") as refused:
        check(plan(preset="a10", num_workers=1), pythia_12b, SEQ)
    workers = int(str(refused.value).rsplit("num_workers=", 1)[1].split()[0])
    assert estimate(plan(preset="a10", num_workers=workers, offload_optimizer=False), pythia_12b, SEQ).fits
    assert not estimate(plan(preset="a10", num_workers=workers - 1, offload_optimizer=False), pythia_12b, SEQ).fits


def test_zero3_with_offload_across_8_h100s_is_accepted(pythia_12b):
    accepted = check(plan(preset="h100", num_workers=8, zero_stage=3, offload_optimizer=True), pythia_12b, SEQ)
    assert accepted.device_gib < 80 and accepted.host["optimizer"] > 100  # the optimizer state lives on the host


def test_each_zero_stage_shards_more_of_the_state(pythia_12b):
    per_device = [estimate(plan(preset="h100", num_workers=8, zero_stage=s), pythia_12b, SEQ).device_gib for s in range(4)]
    assert per_device == sorted(per_device, reverse=True) and len(set(per_device)) == 4


def test_gradient_checkpointing_and_smaller_micro_batches_cut_activations(pythia_12b):
    def activations(**s):
        return estimate(plan(preset="h100", num_workers=8, zero_stage=3, **s), pythia_12b, SEQ).device["activations"]

    assert activations(gradient_checkpointing=True) < activations(gradient_checkpointing=False)
    assert activations(micro_batch_size=2) < activations(micro_batch_size=8)


def test_presets_fill_unset_settings_and_explicit_ones_win():
    assert plan(preset="a100").zero_stage == 3 and plan(preset="a100").precision == "bf16"
    assert plan(preset="a10").offload_optimizer and plan(preset="v100").precision == "fp16"
    assert plan(preset="a100", zero_stage=2).zero_stage == 2
    ds = deepspeed_config(plan(preset="v100", num_workers=8))
    assert ds["fp16"]["enabled"] and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["train_batch_size"] == 8 * 3  # Dolly's V100 per-device batch


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"zero_stage": 2, "offload_params": True}, "offload_params needs zero_stage=3"),
        ({"zero_stage": 0, "offload_optimizer": True}, "offload_optimizer needs ZeRO"),
        ({"precision": "fp16"}, "precision=fp16 needs GPUs"),
        ({"attn_implementation": "flash_attention_2"}, "needs GPUs"),
        ({"method": "lora", "base_model": "base-folder", "zero_stage": 3}, "method=lora with zero_stage=3 needs GPUs"),
        ({"method": "lora"}, "method=lora adapts a base that others can load again"),
        (
            {"method": "lora", "base_model": "base-folder", "zero_stage": 3, "lora": {"quantize": "4bit"}},
            "lora.quantize=4bit with zero_stage=3 is not supported",
        ),
        ({"preset": "h100", "precision": "fp32"}, "bf16 or fp16 only"),
        # flash-attention finds packed examples only in a one-row batch: several rows would cross them.
        ({"preset": "h100", "padding_free": False}, "micro_batch_size=8 would let the examples .* set padding_free=true"),
    ],
)
def test_impossible_combinations_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        plan(**settings)


def test_gpu_presets_train_padding_free_with_flash_attention_and_keep_examples_apart():
    for preset in ("a100", "a10", "h100"):
        assert (plan(preset=preset).attn_implementation, plan(preset=preset).padding_free) == ("flash_attention_2", True)
    assert plan(preset="v100").attn_implementation == "sdpa"  # flash-attention needs Ampere or newer
    assert plan(preset="cpu").attn_implementation == "sdpa" and not plan(preset="cpu").padding_free
    # One row per micro-batch: flash-attention finds the boundaries itself, no flattening needed.
    assert plan(preset="h100", padding_free=False, micro_batch_size=1).micro_batch_size == 1


def test_a_flash_attention_kernel_that_is_not_installed_is_refused_before_any_worker_starts(tmp_path):
    import importlib.util

    from contract.errors import UserError
    from pipelines.train import train

    if importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed here")
    config = plan(preset="h100", data_dir=tmp_path, storage_path=str(tmp_path), output_dir=tmp_path)
    with pytest.raises(UserError, match="flash_attention_2 needs the flash_attn package.*pip install flash-attn"):
        train(config)


def test_a_random_shape_without_a_tokenizer_is_refused():
    with pytest.raises(ValueError, match="set tokenizer"):
        TrainConfig(base_model="pythia-70m-random")


def test_relative_model_and_tokenizer_folders_reach_workers_that_run_elsewhere(tmp_path, monkeypatch):
    """Ray workers run in other working directories: `tokenizer=../shared/tokenizer/pythia` on the
    command line must name the same folder there, while Hub ids and random shapes stay names."""
    from pipelines.train import _absolute

    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "tok").mkdir()
    monkeypatch.chdir(tmp_path / "models")
    config = _absolute(TrainConfig(base_model="base", tokenizer="../tok"))
    assert config.base_model == str(tmp_path / "models" / "base") and Path(config.tokenizer).resolve() == tmp_path / "tok"
    named = _absolute(TrainConfig(base_model="pythia-14m-random", tokenizer="EleutherAI/pythia-2.8b"))
    assert (named.base_model, named.tokenizer) == ("pythia-14m-random", "EleutherAI/pythia-2.8b")


def test_lora_counts_only_the_adapters_gradients_and_optimizer_state():
    """A frozen base still sits in memory whole; what it no longer has is gradients and Adam state."""
    from pipelines.configs import LoraSettings

    full, adapted = ModelShape.of("pythia-1.4b-random"), ModelShape.of("pythia-1.4b-random", lora=LoraSettings())
    assert adapted.n_params == full.n_params and 0 < adapted.trainable < full.trainable / 20
    settings = dict(base_model="EleutherAI/pythia-1.4b", preset="h100", num_workers=1)
    tuned = estimate(plan(**settings), full, SEQ).device
    adapters = estimate(plan(method="lora", **settings), adapted, SEQ).device
    assert adapters["parameters"] == tuned["parameters"]
    assert adapters["gradients"] < tuned["gradients"] / 20 and adapters["optimizer"] < tuned["optimizer"] / 20
