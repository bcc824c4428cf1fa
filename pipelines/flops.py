"""FLOPs accounting: the work one training token costs, and what a whole run will cost before it
starts (its wall time and GPU-hours at a stated MFU).

Ray-free and DeepSpeed-free (pydantic alone): the training loop's MFU, the driver's estimate and
the GPU check (bench/gpu/gpu_check.py, on a device image that has neither) count the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict


def flops_per_token(
    *, layers: int, hidden: int, vocab: int, n_params: int, seq_len: float, trainable: int | None = None
) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's MFU: 2 per
    non-embedding-lookup parameter forward, 2 backward for the activations' gradients and 2 for
    the weights' (only the `trainable` ones: a frozen LoRA base has none), plus the attention
    scores (12 · layers · hidden · seq_len; `attention_length` gives seq_len for mixed lengths).
    Recomputation by gradient checkpointing is not counted: MFU counts useful work."""
    lookup = vocab * hidden  # the input embedding is a gather, not a matmul
    matmuls = n_params - lookup
    weight_grads = matmuls if trainable is None else min(trainable, matmuls)
    return 4 * matmuls + 2 * weight_grads + 12 * layers * hidden * seq_len


def attention_length(lengths: Iterable[int]) -> float:
    """The seq_len of `flops_per_token` for sequences of these (unpadded) lengths: sum(n²)/sum(n).
    Attention costs each token in proportion to its own sequence's length, so a sequence weighs
    by its tokens: the mean length undercounts a batch that mixes short examples with long ones."""
    lengths = list(lengths)
    return sum(n * n for n in lengths) / max(1, sum(lengths))


class RunEstimate(BaseModel):
    """A run's training steps priced before it starts: no start-up, evaluation, checkpoints or
    export, which `assumed_mfu` does not cover either."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flops: float
    devices: int
    device: str  # what the peak is of, e.g. "A100"
    peak_tflops: float  # of one device
    assumed_mfu: float
    seconds: float

    @property
    def gpu_hours(self) -> float:
        return self.seconds / 3600 * self.devices

    def describe(self) -> str:
        hours, minutes = self.seconds / 3600, self.seconds / 60
        wall = f"{hours:.1f} h" if hours >= 1 else f"{minutes:.0f} min" if minutes >= 1 else f"{self.seconds:.0f} s"
        return (
            f"Estimate: {wall} on {self.devices} x {self.device} = {self.gpu_hours:.1f} GPU-hours "
            f"at {100 * self.assumed_mfu:.0f}% MFU ({self.flops:.1e} FLOPs)"
        )


def estimate_run(
    flops_per_token: float, tokens: float, device: str, devices: int, peak_tflops: float, assumed_mfu: float
) -> RunEstimate:
    """`tokens` trained on at `flops_per_token` each, by `devices` devices of `peak_tflops` each,
    working at `assumed_mfu` of that peak."""
    flops = flops_per_token * tokens
    seconds = flops / (devices * peak_tflops * 1e12 * assumed_mfu)
    return RunEstimate(
        flops=flops, devices=devices, device=device, peak_tflops=peak_tflops, assumed_mfu=assumed_mfu, seconds=seconds
    )
