"""Memory preflight: will this plan fit, before a single worker starts?

Out-of-memory is what users of Dolly's recipe hit most, minutes into a launch. Here the memory
of one device, and of one node's host (which holds offloaded state, and every worker's copy of
the model while it loads), is estimated from the model shape and the plan, and a plan that does
not fit is refused with the estimate and the cheapest change that would fit.

The model (per device, N = num_workers, P = parameters, w = 2 bytes in bf16/fp16, 4 in fp32):
- parameters P·w, gradients T·w, optimizer state 12·T (fp32 master + Adam moments; 8·T in fp32),
  where T = P for full fine-tuning and the adapters' and new token rows' count for LoRA;
  ZeRO-1 divides the optimizer state by N, ZeRO-2 the gradients too, ZeRO-3 the parameters too
  (plus the parameters it keeps gathered: up to stage3_max_live_parameters, and its prefetch
  bucket);
- DeepSpeed's communication buckets, at the sizes `pipelines/deepspeed_config.py` leaves to
  DeepSpeed's defaults: one gradient reduce bucket of reduce_bucket_size elements, two with
  overlap_comm (one fills while the other is reduced);
- offload_optimizer moves the optimizer state and an fp32 gradient partition to host memory (the
  device keeps only the reduce buckets the gradients pass through);
  offload_params moves the parameters there (the device keeps the gathered ones);
- activations for one micro-batch of b rows of s tokens, hidden h, L layers: with gradient
  checkpointing L·b·s·h·w for the saved layer inputs plus one layer's working set, else
  34·b·s·h·w/2 per layer (Korthikanti et al. 2022, without the s² scores that SDPA does not
  keep); plus the logits over the vocabulary V: b·s·V·(w + 8) for the logits and the fp32 loss;
- a fixed allowance for the CUDA context, NCCL and fragmentation.

And per node, at model load: without ZeRO-3 every worker builds or reads the whole model on the
host before DeepSpeed moves it to its device (workers per node x P·w: 12b x 8 workers is ~192 GB
in bf16); with ZeRO-3, transformers builds it partitioned under zero.Init (the worker's
HfDeepSpeedConfig is alive when it loads) and only rank 0 reads a checkpoint's values on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from contract.errors import UserError
from pipelines.configs import LoraSettings, TrainConfig
from pipelines.deepspeed_config import deepspeed_config
from pipelines.presets import PRESETS

GIB = 2**30
# CUDA context, NCCL, allocator fragmentation; on CPU workers, the interpreter, torch and Ray's
# own share.
GPU_OVERHEAD_GIB = 2.0
CPU_OVERHEAD_GIB = 0.75
# DeepSpeed's defaults for what our config leaves unset, from its configuration reference
# (deepspeed.ai/docs/config-json, "ZeRO Optimizations for FP16 Training"): reduce_bucket_size
# 5e8 elements, and the non-ZeRO engine all-reduces in buckets of the same size.
# stage3_prefetch_bucket_size is 5e7 in the DeepSpeed we pin (DeepSpeedZeroConfig; the reference's
# table says 5e8). allgather_bucket_size (5e8) holds nothing of its own: ZeRO-1/2 all-gather the
# updated parameters in place into their flat buffer (all_gather_into_tensor), and ZeRO-3 gathers
# by the prefetch bucket instead. overlap_comm defaults to true for ZeRO-3 only; our config sets
# it wherever there are CUDA streams (use_gpu).
REDUCE_BUCKET_ELEMENTS = 5e8
PREFETCH_BUCKET_ELEMENTS = 5e7


class PlanDoesNotFit(UserError):
    pass


@dataclass(frozen=True)
class ModelShape:
    n_params: int
    trainable: int  # n_params for full fine-tuning; the adapters' and token rows' for LoRA
    layers: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, base_model: str, gguf_file: str | None = None, lora: LoraSettings | None = None) -> ModelShape:
        """The shape of a random Pythia name, an HF folder or a Hub id, from its config alone
        (the model is built on the meta device: no weights are read or allocated); with `lora`,
        as adapted by PEFT."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from contract import SPECIAL_TOKENS
        from contract.models import pythia_config, random_pythia_size, resolve_base

        size = random_pythia_size(base_model)
        config = pythia_config(size) if size else AutoConfig.from_pretrained(resolve_base(base_model), gguf_file=gguf_file)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
            n_params = sum(p.numel() for p in model.parameters())
            if lora is not None:
                from pipelines.lora import adapt  # PEFT, only when asked for

                model = adapt(model, lora, list(range(len(SPECIAL_TOKENS))), base_model)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return cls(n_params, trainable, config.num_hidden_layers, config.hidden_size, config.vocab_size)


@dataclass(frozen=True)
class Estimate:
    device: dict[str, float]  # GiB per device, by part
    host: dict[str, float]  # GiB per node while training, by part
    load: dict[str, float]  # GiB per node while the model loads, by part
    device_budget_gib: float | None  # None: workers share host memory (CPU)
    host_budget_gib: float

    @property
    def device_gib(self) -> float:
        return sum(self.device.values())

    @property
    def host_gib(self) -> float:
        return sum(self.host.values())

    @property
    def load_gib(self) -> float:
        return sum(self.load.values())

    @property
    def short_of(self) -> list[str]:
        """The memories this plan does not fit in; empty: it fits."""
        short = []
        if self.device_budget_gib is not None and self.device_gib > self.device_budget_gib:
            short.append("device memory")
        if self.host_gib > self.host_budget_gib:
            short.append("host memory")
        if self.load_gib > self.host_budget_gib:
            short.append("host memory at model load")
        return short

    @property
    def fits(self) -> bool:
        return not self.short_of

    def describe(self) -> str:
        def parts(d: dict) -> str:
            return " + ".join(f"{name} {gib:.1f}" for name, gib in d.items() if gib >= 0.05) or "0"

        lines = []
        if self.device_budget_gib is not None:
            lines.append(f"per device: {self.device_gib:.1f} GiB of {self.device_budget_gib:.0f} ({parts(self.device)})")
        lines.append(f"per node (host): {self.host_gib:.1f} GiB of {self.host_budget_gib:.0f} ({parts(self.host)})")
        lines.append(f"per node (host) at model load: {self.load_gib:.1f} GiB of {self.host_budget_gib:.0f} ({parts(self.load)})")
        return "\n".join(lines)


def estimate(config: TrainConfig, shape: ModelShape, seq_len: int) -> Estimate:
    n, p, t = config.num_workers, shape.n_params, shape.trainable
    w = 4 if config.precision == "fp32" else 2
    optimizer_bytes = 8 * t if config.precision == "fp32" else 12 * t
    stage = config.zero_stage
    # A 4-bit base (QLoRA) holds half a byte per parameter, and a little for its scales.
    weight_bytes = 0.55 if _quantized(config) else w
    params = p * weight_bytes / (n if stage == 3 else 1)
    grads = t * w / (n if stage >= 2 else 1)
    optimizer = optimizer_bytes / (n if stage >= 1 else 1)
    device = {
        "parameters": params,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": _activations(config, shape, seq_len, w),
        **_zero_buffers(config, p, w),
    }
    host_each = {"optimizer": 0.0, "parameters": 0.0}
    if config.offload_optimizer:
        # The optimizer runs on the host, on an fp32 copy of the gradient partition; the device
        # keeps only the reduce buckets the gradients pass through on their way there.
        host_each["optimizer"] = device.pop("optimizer") + 4 * t / n
        device.pop("gradients")
    if config.offload_params:
        host_each["parameters"] = device.pop("parameters")
    preset = PRESETS[config.preset] if config.preset else None
    host_budget = config.host_memory_gib or (preset.host_memory_gib if preset else None) or psutil.virtual_memory().total / GIB
    on_gpu = config.use_gpu
    workers_per_node = min(n, preset.devices_per_node) if preset and on_gpu else n
    device = {k: v / GIB for k, v in device.items()}
    device["overhead"] = GPU_OVERHEAD_GIB if on_gpu else CPU_OVERHEAD_GIB
    host = {k: v * workers_per_node / GIB for k, v in host_each.items()}
    load = {k: v / GIB for k, v in _load_peak(config, p, w, workers_per_node).items()}
    if on_gpu:
        device_budget = config.device_memory_gib or (preset.device_memory_gib if preset else None)
        if device_budget is None:
            raise UserError(
                "use_gpu=true needs the GPU's memory for the preflight: set preset (a100, a10, v100, h100) "
                "or device_memory_gib, or preflight=false"
            )
    else:
        # CPU workers keep everything in host memory: their device share is host memory too.
        host.update({f"workers' {k}": v * workers_per_node for k, v in device.items()})
        device, device_budget = {}, None
    return Estimate(device, host, load, device_budget, host_budget)


def _quantized(config: TrainConfig) -> bool:
    return config.method == "lora" and config.lora.quantize == "4bit"


def _zero_buffers(config: TrainConfig, p: int, w: int) -> dict[str, float]:
    """Bytes per device of what DeepSpeed allocates around the model state, read from the config
    the workers run (`deepspeed_config`), DeepSpeed's defaults where it sets nothing."""
    zero = deepspeed_config(config)["zero_optimization"]
    stage = zero["stage"]
    overlap = zero.get("overlap_comm", stage == 3)
    # Gradients are reduced from contiguous buckets in their own dtype (our config sets
    # contiguous_gradients); with overlap_comm one bucket fills while the other is reduced.
    buckets = 2 if stage and overlap else 1
    buffers = {"reduce buckets": buckets * zero.get("reduce_bucket_size", REDUCE_BUCKET_ELEMENTS) * w}
    if stage == 3:
        # Gathered parameters stay until released: up to stage3_max_live_parameters of them.
        live = zero.get("stage3_max_live_parameters", int(1e9))
        buffers["gathered parameters"] = min(p, live) * w
        buffers["prefetch bucket"] = zero.get("stage3_prefetch_bucket_size", PREFETCH_BUCKET_ELEMENTS) * w
    return buffers


def _load_peak(config: TrainConfig, p: int, w: int, workers_per_node: int) -> dict[str, float]:
    """Bytes of host memory one node holds while the model loads (`train_worker._engine`), before
    DeepSpeed moves or partitions it."""
    if _quantized(config):
        return {}  # bitsandbytes quantizes each weight as it is placed on the worker's device
    if config.zero_stage == 3:
        # transformers under zero.Init: each rank builds only its partition; rank 0 alone reads a
        # checkpoint's values on the host (the others read its shapes).
        return {"rank 0's copy of the model": p * w}
    return {f"{workers_per_node} workers' copies of the model": workers_per_node * p * w}


def _activations(config: TrainConfig, shape: ModelShape, seq_len: int, w: int) -> float:
    b, s, h = config.micro_batch_size, seq_len, shape.hidden
    layer_working_set = 34 * b * s * h * w / 2
    if config.gradient_checkpointing:
        hidden_states = shape.layers * b * s * h * w + layer_working_set
    else:
        hidden_states = shape.layers * layer_working_set
    logits = b * s * shape.vocab * (w + 8)
    return hidden_states + logits


# Changes tried in order of cost, cheapest first: memory for compute, then communication, then
# host memory and PCIe traffic, then smaller batches.
_REMEDIES: list[tuple[str, dict]] = [
    ("turn on gradient checkpointing", {"gradient_checkpointing": True}),
    # ZeRO-3 also loads the model partitioned: one copy on one host, not one per worker.
    ("shard everything with ZeRO-3", {"zero_stage": 3, "gradient_checkpointing": True}),
    ("offload the optimizer to CPU", {"zero_stage": 3, "gradient_checkpointing": True, "offload_optimizer": True}),
    (
        "offload optimizer and parameters to CPU",
        {"zero_stage": 3, "gradient_checkpointing": True, "offload_optimizer": True, "offload_params": True},
    ),
]


def check(config: TrainConfig, shape: ModelShape, seq_len: int) -> Estimate:
    """The estimate, if the plan fits; else PlanDoesNotFit with the estimate and a suggestion."""
    plan = estimate(config, shape, seq_len)
    if plan.fits:
        return plan
    raise PlanDoesNotFit(
        f"this plan does not fit in {' or '.join(plan.short_of)}: {config.base_model} ({shape.n_params / 1e9:.2f} B parameters), "
        f"{config.num_workers} worker(s), ZeRO-{config.zero_stage}, {config.precision}, micro_batch_size "
        f"{config.micro_batch_size} x {seq_len} tokens, gradient_checkpointing={config.gradient_checkpointing}, "
        f"offload_optimizer={config.offload_optimizer}, offload_params={config.offload_params}\n"
        f"{plan.describe()}\n{suggest(config, shape, seq_len)}\n(preflight=false skips this check)"
    )


def suggest(config: TrainConfig, shape: ModelShape, seq_len: int) -> str:
    """The first change, cheapest first, that makes the plan fit, as settings to pass."""
    base = config.model_dump()

    def fits(changes: dict) -> Estimate | None:
        candidate = TrainConfig.model_validate({**base, **changes})
        plan = estimate(candidate, shape, seq_len)
        return plan if plan.fits else None

    def changed(changes: dict) -> dict:
        return {k: v for k, v in changes.items() if base[k] != v}

    most = {}
    for why, changes in _REMEDIES:
        most = changed(changes)
        if most and (plan := fits(most)):
            return f"suggestion: {why}: {_as_args(most)} ({_headline(plan)})"
    for mbs in range(config.micro_batch_size - 1, 0, -1):
        if plan := fits({**most, "micro_batch_size": mbs}):
            return f"suggestion: also smaller micro-batches: {_as_args({**most, 'micro_batch_size': mbs})} ({_headline(plan)})"
    sharded = {"zero_stage": 3, "gradient_checkpointing": True, "offload_optimizer": False, "offload_params": False}
    for workers in range(config.num_workers + 1, 1025):
        if plan := fits({**sharded, "num_workers": workers}):
            return f"suggestion: more devices: {_as_args(changed({**sharded, 'num_workers': workers}))} ({_headline(plan)})"
    return "suggestion: no setting makes this fit: use devices with more memory, or a smaller base_model"


def _as_args(changes: dict) -> str:
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())


def _headline(plan: Estimate) -> str:
    device = f"{plan.device_gib:.1f} GiB per device, " if plan.device_budget_gib is not None else ""
    return f"estimated {device}{max(plan.host_gib, plan.load_gib):.1f} GiB host per node at its peak"
