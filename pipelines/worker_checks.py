"""What only a training worker can answer: does the image the workers run have the packages the
plan needs, and does torch there see the GPU Ray gave it?

`pipelines.train` runs `check` as a Ray task placed as one training worker is, after the plan's
own checks (memory, time) and before the TorchTrainer starts. The driver's image does not
matter: a laptop submitting to a cluster has no flash_attn and needs none, while a cluster image
that lacks it is refused in seconds, not after every worker has started and loaded its model.
Nothing heavy is imported at module level, so the task starts in a fresh worker quickly.
"""

from __future__ import annotations

import importlib.util

# The package each flash-attention kernel comes from, and how to get it.
KERNEL_PACKAGES = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash_attn_interface", "build FlashAttention-3 from flash-attention's hopper/ folder"),
}


def needed(attn_implementation: str, quantize: bool, use_gpu: bool) -> bool:
    """Whether a plan has anything for a worker to check (a CPU run on sdpa has not)."""
    return use_gpu or quantize or attn_implementation in KERNEL_PACKAGES


def check(attn_implementation: str, quantize: bool, use_gpu: bool) -> tuple[list[str], str]:
    """(what this process's image lacks for the plan, each with its fix; where it looked)."""
    return problems(attn_implementation, quantize, use_gpu), where()


def problems(attn_implementation: str, quantize: bool, use_gpu: bool) -> list[str]:
    found = []
    if attn_implementation in KERNEL_PACKAGES:
        package, how = KERNEL_PACKAGES[attn_implementation]
        if importlib.util.find_spec(package) is None:
            found.append(
                f"attn_implementation={attn_implementation} needs the {package} package, which is not installed: "
                f"{how}, or set attn_implementation=sdpa (correct, but it computes the pads and the masked blocks)"
            )
    if quantize and importlib.util.find_spec("bitsandbytes") is None:
        found.append(
            "lora.quantize=4bit needs bitsandbytes, which is not installed: pip install 'dolly-ray[qlora]', "
            "or train the adapters on the unquantized base (lora.quantize=null)"
        )
    if use_gpu:
        import torch

        if not torch.cuda.is_available():
            found.append(
                f"torch {torch.__version__} sees no CUDA device on a node where Ray gave this process a GPU: "
                "install a CUDA build of torch in the image, or check the node's NVIDIA driver"
            )
    return found


def where() -> str:
    """This process's node and the GPUs Ray gave it."""
    import ray

    gpus = ", ".join(str(i) for i in ray.get_gpu_ids())
    return f"node {ray.util.get_node_ip_address()}" + (f", GPU {gpus}" if gpus else ", no GPU")
