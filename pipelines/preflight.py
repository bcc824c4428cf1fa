"""Memory preflight: will this plan fit, before a single worker starts?

Out-of-memory is what users of Dolly's recipe hit most, minutes into a launch. Here the memory
of one device (and of one node's host, which holds offloaded state) is estimated from the model
shape and the plan, and a plan that does not fit is refused with the estimate and the cheapest
change that would fit.

The model (per device, N = num_workers, P = parameters, w = 2 bytes in bf16/fp16, 4 in fp32):
- parameters P·w, gradients T·w, optimizer state 12·T (fp32 master + Adam moments; 8·T in fp32),
  where T = P for full fine-tuning and the adapters' and new token rows' count for LoRA;
  ZeRO-1 divides the optimizer state by N, ZeRO-2 the gradients too, ZeRO-3 the parameters too
  (plus the largest layer, gathered whole while it runs);
- offload_optimizer moves the optimizer state and an fp32 gradient partition to host memory (the
  device keeps one reduce bucket of gradients);
  offload_params moves the parameters there (the device keeps the layers in flight);
- activations for one micro-batch of b rows of s tokens, hidden h, L layers: with gradient
  checkpointing L·b·s·h·w for the saved layer inputs plus one layer's working set, else
  34·b·s·h·w/2 per layer (Korthikanti et al. 2022, without the s² scores that SDPA does not
  keep); plus the logits over the vocabulary V: b·s·V·(w + 8) for the logits and the fp32 loss;
- a fixed allowance for the CUDA context, communication buckets and fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from contract.errors import UserError
from pipelines.configs import LoraSettings, TrainConfig
from pipelines.presets import PRESETS

GIB = 2**30
# CUDA context, NCCL and ZeRO buckets, allocator fragmentation; on CPU workers, the interpreter,
# torch and Ray's own share.
GPU_OVERHEAD_GIB = 2.0
CPU_OVERHEAD_GIB = 0.75
REDUCE_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size


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
    host: dict[str, float]  # GiB per node, by part
    device_budget_gib: float | None  # None: workers share host memory (CPU)
    host_budget_gib: float

    @property
    def device_gib(self) -> float:
        return sum(self.device.values())

    @property
    def host_gib(self) -> float:
        return sum(self.host.values())

    @property
    def fits(self) -> bool:
        device_ok = self.device_budget_gib is None or self.device_gib <= self.device_budget_gib
        return device_ok and self.host_gib <= self.host_budget_gib

    def describe(self) -> str:
        def parts(d: dict) -> str:
            return " + ".join(f"{name} {gib:.1f}" for name, gib in d.items() if gib >= 0.05) or "0"

        lines = []
        if self.device_budget_gib is not None:
            lines.append(f"per device: {self.device_gib:.1f} GiB of {self.device_budget_gib:.0f} ({parts(self.device)})")
        lines.append(f"per node (host): {self.host_gib:.1f} GiB of {self.host_budget_gib:.0f} ({parts(self.host)})")
        return "\n".join(lines)


def estimate(config: TrainConfig, shape: ModelShape, seq_len: int) -> Estimate:
    n, p, t = config.num_workers, shape.n_params, shape.trainable
    w = 4 if config.precision == "fp32" else 2
    optimizer_bytes = 8 * t if config.precision == "fp32" else 12 * t
    stage = config.zero_stage
    # A 4-bit base (QLoRA) holds half a byte per parameter, and a little for its scales.
    weight_bytes = 0.55 if config.method == "lora" and config.lora.quantize == "4bit" else w
    params = p * weight_bytes / (n if stage == 3 else 1)
    grads = t * w / (n if stage >= 2 else 1)
    optimizer = optimizer_bytes / (n if stage >= 1 else 1)
    layer = p / max(1, shape.layers) * w  # one layer, about: what ZeRO-3 gathers to run it
    device = {
        "parameters": params,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": _activations(config, shape, seq_len, w),
    }
    host_each = {"optimizer": 0.0, "parameters": 0.0}
    if stage == 3:
        device["gathered layers"] = 2 * layer  # the running layer and the prefetched next one
    if config.offload_optimizer:
        # The optimizer runs on the host, on an fp32 copy of the gradient partition; the device
        # keeps only the reduce bucket the gradients pass through on their way there.
        host_each["optimizer"] = device.pop("optimizer") + 4 * t / n
        device["gradients"] = min(grads, REDUCE_BUCKET_ELEMENTS * w)
    if config.offload_params:
        host_each["parameters"] = device.pop("parameters")
    preset = PRESETS[config.preset] if config.preset else None
    host_budget = config.host_memory_gib or (preset.host_memory_gib if preset else None) or psutil.virtual_memory().total / GIB
    on_gpu = config.use_gpu
    workers_per_node = min(n, preset.devices_per_node) if preset and on_gpu else n
    device = {k: v / GIB for k, v in device.items()}
    device["overhead"] = GPU_OVERHEAD_GIB if on_gpu else CPU_OVERHEAD_GIB
    host = {k: v * workers_per_node / GIB for k, v in host_each.items()}
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
    return Estimate(device, host, device_budget, host_budget)


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
        f"this plan does not fit: {config.base_model} ({shape.n_params / 1e9:.2f} B parameters), "
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
    return f"estimated {device}{plan.host_gib:.1f} GiB host per node"
