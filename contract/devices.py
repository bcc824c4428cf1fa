"""Which device a model process uses, and in which precision: the GPU Ray gave it, never one
behind Ray's back.

Ray 2.60 sets CUDA_VISIBLE_DEVICES only for tasks and actors that asked for a GPU: one that asked
for none sees every GPU of its node, and `torch.cuda.is_available()` alone would have it take
cuda:0, which another replica or a training worker owns. So inside Ray a process uses CUDA only
when Ray assigned it a GPU; outside Ray (a plain script, `dolly eval` on a workstation) when
there is one.
"""

from __future__ import annotations

import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ray_gpu_ids() -> list[str] | None:
    """The GPUs Ray assigned to this process; None outside a Ray task or actor."""
    ray = sys.modules.get("ray")  # not imported here: the GPU check runs where Ray is not installed
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return None  # the driver: Ray assigns it nothing
    return [str(i) for i in ray.get_gpu_ids()]


def default_device() -> torch.device:
    """CUDA if this process may use a GPU (see the module doc), else the CPU."""
    assigned = ray_gpu_ids()
    may_use_gpu = bool(assigned) if assigned is not None else True
    return torch.device("cuda" if may_use_gpu and torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that computes it natively (Ampere and newer), float16 on older ones
    (V100, T4: bfloat16 is emulated there, several times slower), float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16
