"""The DeepSpeed config and learning-rate schedule a TrainConfig asks for.

Dolly's configs leave most values on "auto" for the HF Trainer to fill in; with no Trainer in
between, every value here is concrete, so the config a run used is the config it logs.
"""

from __future__ import annotations

import math

from pipelines.configs import TrainConfig


def deepspeed_config(config: TrainConfig, universal: bool = False) -> dict:
    """`universal`: the run resumes from a universal checkpoint (pipelines/checkpoints.py), one
    written by another number of workers."""
    zero: dict = {"stage": config.zero_stage}
    if config.zero_stage:
        # Pinned host memory speeds GPU<->CPU copies; on CPU workers there is nothing to pin for.
        offload = {"device": "cpu", "pin_memory": config.use_gpu}
        if config.offload_optimizer:
            zero["offload_optimizer"] = offload
        if config.offload_params:
            zero["offload_param"] = offload
        # Overlapping communication with compute needs CUDA streams; gloo on CPU has none.
        zero.update(overlap_comm=config.use_gpu, contiguous_gradients=True)
    if config.zero_stage == 3:
        # Dolly's A100 settings; the 16-bit gather is what export relies on.
        zero.update(
            sub_group_size=int(1e9),
            stage3_max_live_parameters=int(1e9),
            stage3_max_reuse_distance=int(1e9),
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch_size * config.grad_accum * config.num_workers,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": config.lr,
                "betas": list(config.betas),
                "eps": 1e-8,
                "weight_decay": config.weight_decay,
                # On CPU workers DeepSpeed's FusedAdam is a C++ op JIT-compiled on first use
                # (minutes on a small machine); torch's AdamW needs no build. An offloaded
                # optimizer keeps DeepSpeed's CPU Adam, which ZeRO-Offload requires.
                "torch_adam": not config.use_gpu and not config.offload_optimizer,
            },
        },
        "checkpoint": {"load_universal": universal},
        "steps_per_print": 10**9,  # progress is ours to report
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup from 0, then constant,
    linear or cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.decay == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    shape = 1.0 - progress if config.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape
