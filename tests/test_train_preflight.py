"""The plan's checks, before any worker starts: the memory preflight refuses a plan that cannot
fit (on the device, on the host, or on the host while the model loads), says by how much, and
names a change that fits; the run's time and cost are estimated from its FLOPs; and only then are
the checks that only the cluster can answer (its GPUs, the workers' packages) asked where the
workers run. Presets fill in what a config leaves unset."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from contract.errors import UserError
from pipelines.configs import TrainConfig
from pipelines.deepspeed_config import deepspeed_config
from pipelines.flops import attention_length, estimate_run, flops_per_token
from pipelines.preflight import ModelShape, PlanDoesNotFit, check, estimate
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(60)
SEQ = 2048
GIB = 2**30


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


def test_deepspeeds_reduce_buckets_are_counted_twice_with_overlap_comm_and_zero3_adds_its_gathered_parameters(pythia_12b):
    # DeepSpeed's default reduce_bucket_size is 5e8 elements; our config overlaps communication on GPUs.
    on_gpus = estimate(plan(preset="h100", num_workers=8, zero_stage=2), pythia_12b, SEQ).device
    assert on_gpus["reduce buckets"] == pytest.approx(2 * 5e8 * 2 / GIB)
    on_cpus = estimate(plan(preset="cpu", num_workers=2), pythia_12b, SEQ).host
    assert on_cpus["workers' reduce buckets"] == pytest.approx(2 * 1 * 5e8 * 4 / GIB), "gloo: no overlap, one bucket each"
    zero3 = estimate(plan(preset="a100", num_workers=8), pythia_12b, SEQ).device
    assert zero3["gathered parameters"] == pytest.approx(1e9 * 2 / GIB), "stage3_max_live_parameters=1e9"
    assert zero3["prefetch bucket"] == pytest.approx(5e7 * 2 / GIB)


def test_a_plan_whose_workers_cannot_all_load_the_model_on_one_host_is_refused_with_zero3_as_the_fix(pythia_12b):
    """Without ZeRO-3 each of a node's 8 workers reads all 12b parameters on the host first."""
    with pytest.raises(PlanDoesNotFit) as refused:
        check(plan(preset="h100", num_workers=8, host_memory_gib=150), pythia_12b, SEQ)
    message = str(refused.value)
    assert "does not fit in host memory at model load" in message
    assert "at model load: 176.5 GiB of 150 (8 workers' copies of the model 176.5)" in message
    assert "suggestion: shard everything with ZeRO-3: zero_stage=3" in message
    # zero.Init builds each rank's partition; only rank 0 reads the checkpoint on the host.
    zero3 = check(plan(preset="h100", num_workers=8, host_memory_gib=150, zero_stage=3), pythia_12b, SEQ)
    assert zero3.load == {"rank 0's copy of the model": pytest.approx(pythia_12b.n_params * 2 / GIB)}


def test_flops_per_token_counts_matmuls_forward_and_backward_and_attention_at_the_token_weighted_length():
    # 100 parameters, 40 of them the embedding lookup: 60 in matmuls; attention 12 * 2 * 4 * 8.
    assert flops_per_token(layers=2, hidden=4, vocab=10, n_params=100, seq_len=8) == 4 * 60 + 2 * 60 + 768 == 1128
    assert flops_per_token(layers=2, hidden=4, vocab=10, n_params=100, seq_len=8, trainable=10) == 240 + 20 + 768
    # A 1-token and a 3-token example: 3 of the 4 tokens attend over 3 positions.
    assert attention_length([1, 3]) == (1 + 9) / 4 == 2.5


def test_a_runs_time_and_gpu_hours_come_from_its_flops_the_peak_and_the_assumed_mfu():
    # 6e9 FLOPs per token x 1e9 tokens, on 8 x 312 TFLOP/s at 35%: 6e18 / 8.736e14 = 6868 s.
    cost = estimate_run(6e9, 1e9, "A100", 8, 312, 0.35)
    assert cost.seconds == pytest.approx(6868.13, abs=0.01) and cost.gpu_hours == pytest.approx(15.262, abs=1e-3)
    assert cost.describe() == "Estimate: 1.9 h on 8 x A100 = 15.3 GPU-hours at 35% MFU (6.0e+18 FLOPs)"


def run_config(tmp_path: Path, data: Path, tokenizer_path: str, **settings) -> TrainConfig:
    paths = {"storage_path": str(tmp_path / "storage"), "output_dir": tmp_path / "out", "registry": tmp_path / "registry"}
    return plan(**{"tokenizer": tokenizer_path, "data_dir": data, "num_workers": 1, "micro_batch_size": 1, **paths, **settings})


def test_a_plan_that_does_not_fit_is_refused_before_any_package_is_asked_for(tmp_path, train_data, tokenizer_path):
    """A laptop without flash_attn hears that 12b does not fit one A10, not that it lacks flash_attn."""
    from pipelines.train import train

    if importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed here")
    with pytest.raises(PlanDoesNotFit, match="this plan does not fit"):
        train(run_config(tmp_path, train_data, tokenizer_path, preset="a10", micro_batch_size=4), Console(file=io.StringIO()))


@pytest.mark.timeout(120)
def test_gpus_asked_of_a_cluster_without_any_are_refused_at_once_after_the_estimate(tmp_path, train_data, tokenizer_path):
    from pipelines.train import train

    console = Console(record=True, file=io.StringIO(), width=200)
    with pytest.raises(UserError, match=r"preset=h100 trains on GPUs, and this Ray cluster has none .*preset=cpu.*--address"):
        train(run_config(tmp_path, train_data, tokenizer_path, base_model="pythia-14m-random", preset="h100"), console)
    assert re.search(
        r"Estimate: [\d.]+ (h|min|s) on 1 x H100 = [\d.]+ GPU-hours at 35% MFU \([\d.]+e\+\d+ FLOPs\)", console.export_text()
    )


@pytest.mark.timeout(300)
def test_packages_are_checked_in_a_task_on_a_gpu_where_the_workers_run_and_refused_with_the_fix(
    tmp_path, train_data, tokenizer_path
):
    """A driver of its own, on a local Ray that declares a GPU: the check runs in a worker process
    Ray gave that GPU to, and that process's image has no flash_attn."""
    if importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed here")
    config = run_config(tmp_path, train_data, tokenizer_path, base_model="pythia-14m-random", preset="h100")
    program = f"""
import json, ray
from contract.errors import UserError
from pipelines.configs import TrainConfig
from pipelines.train import train
ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
try:
    train(TrainConfig.model_validate_json({config.model_dump_json()!r}))
except UserError as refused:
    print(json.dumps(str(refused)))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=280, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    message = json.loads(done.stdout.strip().splitlines()[-1])
    assert re.search(r"checked on node [\d.]+, GPU 0\)", message), message
    assert "attn_implementation=flash_attention_2 needs the flash_attn package" in message
    assert "pip install flash-attn" in message and "or set attn_implementation=sdpa" in message
    assert "sees no CUDA device" in message, "and torch there has no GPU to use either (this machine has none)"


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
