"""Hardware presets: what a device can hold and do, and the training settings that suit it.

A preset fills in the settings a config leaves unset (explicit settings always win), and tells
the memory preflight how much a device holds and the metrics what its peak FLOP/s are. Its `demo`
is what `dolly up` trains with where the user sets nothing. The
GPU recipes are Dolly's DeepSpeed configs (A100: ZeRO-3 bf16; A10: plus optimizer offload; V100:
plus fp16) with Dolly's per-device batch sizes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Ampere and newer: flash-attention's variable-length kernel over each micro-batch flattened into one
# row computes neither pads nor the masked blocks between packed examples.
FLASH = dict(attn_implementation="flash_attention_2", padding_free=True)

PresetName = Literal["a100", "a10", "v100", "h100", "cpu"]


class HardwarePreset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str
    device_memory_gib: float | None = Field(description="memory of one device; None: the worker shares host memory (CPU)")
    host_memory_gib: float | None = Field(description="CPU memory of one node, where offloaded state lives; None: this machine's")
    devices_per_node: int
    peak_tflops: float | None = Field(description="dense peak of one device at the preset's precision (for MFU); None: unknown")
    settings: dict = Field(description="TrainConfig settings the preset implies")
    demo: dict = Field(
        default_factory=dict,
        description="TrainConfig settings of `dolly up`'s run where the user sets none; empty: Dolly's recipe",
    )


PRESETS: dict[str, HardwarePreset] = {
    "a100": HardwarePreset(
        description="NVIDIA A100 40 GB (Dolly's 8-GPU node): ZeRO-3, bf16",
        device_memory_gib=40,
        host_memory_gib=1024,
        devices_per_node=8,
        peak_tflops=312,
        settings=dict(
            use_gpu=True,
            zero_stage=3,
            precision="bf16",
            offload_optimizer=False,
            micro_batch_size=6,
            gradient_checkpointing=True,
            **FLASH,
        ),
    ),
    "a10": HardwarePreset(
        description="NVIDIA A10 24 GB: ZeRO-3, bf16, optimizer offloaded to CPU",
        device_memory_gib=24,
        host_memory_gib=192,
        devices_per_node=4,
        peak_tflops=125,
        settings=dict(
            use_gpu=True,
            zero_stage=3,
            precision="bf16",
            offload_optimizer=True,
            micro_batch_size=4,
            gradient_checkpointing=True,
            **FLASH,
        ),
    ),
    "v100": HardwarePreset(
        description="NVIDIA V100 16 GB (no bf16): ZeRO-3, fp16, optimizer offloaded to CPU",
        device_memory_gib=16,
        host_memory_gib=256,
        devices_per_node=8,
        peak_tflops=125,
        settings=dict(
            use_gpu=True,
            zero_stage=3,
            precision="fp16",
            offload_optimizer=True,
            micro_batch_size=3,
            gradient_checkpointing=True,
            attn_implementation="sdpa",  # flash-attention needs Ampere or newer
        ),
    ),
    "h100": HardwarePreset(
        description="NVIDIA H100 80 GB SXM: ZeRO-2 (memory to spare, less communication than ZeRO-3), bf16",
        device_memory_gib=80,
        host_memory_gib=2048,
        devices_per_node=8,
        peak_tflops=989,
        settings=dict(
            use_gpu=True,
            zero_stage=2,
            precision="bf16",
            offload_optimizer=False,
            micro_batch_size=8,
            gradient_checkpointing=True,
            **FLASH,
        ),
    ),
    "cpu": HardwarePreset(
        description="CPU workers over gloo (tests, laptops): ZeRO-2, fp32",
        device_memory_gib=None,
        host_memory_gib=None,
        devices_per_node=2,
        peak_tflops=None,
        settings=dict(
            use_gpu=False,
            zero_stage=2,
            precision="fp32",
            offload_optimizer=False,
            micro_batch_size=4,
            gradient_checkpointing=False,
            attn_implementation="sdpa",
        ),
        # A few minutes of training on a laptop (bench/RESULTS.md): one worker (on one machine's cores a
        # second adds gradient traffic and start-up, not tokens/s), packed rows (1.6x the tokens/s of
        # padded ones), short examples, and a learning rate for 30 steps (higher made the answers loop).
        demo=dict(
            num_workers=1,
            max_steps=30,
            micro_batch_size=2,
            lr=5e-5,
            warmup_steps=3,
            eval_batches=4,
            checkpoint_every=15,
            prepare=dict(pack=True, max_length=256),
        ),
    ),
}
