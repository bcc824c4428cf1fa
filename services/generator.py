"""An exported model, loaded for serving, that turns a prompt into a stream of response text.

Loading is strict: safetensors weights only and never `trust_remote_code`, so serving a folder
cannot run code that came with it. Everything about the prompt, the special tokens and the
response comes from the shared contract.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from contract import registry
from contract.devices import DTYPES, default_device, default_dtype
from contract.errors import UserError
from contract.models import load_model, load_tokenizer, stop_token_ids
from contract.sampling import SamplingParams
from services.config import EngineConfig
from services.engines import Job, make_engine
from services.prompts import context_limit
from services.text import TextStream


def device_and_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """The replica's device: the GPU Ray gave it (deployment.num_gpus), else the CPU."""
    device = default_device() if config.device == "auto" else torch.device(config.device)
    if config.dtype == "auto":
        return device, default_dtype(device)
    if config.dtype == "float16" and device.type == "cpu":
        raise UserError("engine.dtype=float16 needs a GPU; on CPU use float32 or bfloat16")
    return device, DTYPES[config.dtype]


@dataclass
class Usage:
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None
    batch_size: int = 0


class TextGenerator:
    """One replica's model and batching engine."""

    def __init__(self, folder: Path, config: EngineConfig, adapter: str | None = None):
        """`folder`'s model; or with `adapter`, the LoRA adapter in `folder` kept apart from its
        base under that name, so that others can join it (services/adapters.py)."""
        registry.check_servable(folder)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.device, dtype = device_and_dtype(config)
        self.tokenizer = load_tokenizer(str(folder))
        strict = dict(dtype=dtype, use_safetensors=True, trust_remote_code=False)
        if adapter is None:
            model = load_model(str(folder), self.tokenizer, **strict)
        else:
            base = load_model(registry.adapter_base(folder), self.tokenizer, **strict)
            model = PeftModel.from_pretrained(base, str(folder), adapter_name=adapter)
        self.model = model.to(self.device).eval()
        self.context_limit = context_limit(folder, self.tokenizer, config.max_context)
        self.engine = make_engine(
            self.model, stop_token_ids(folder, self.tokenizer), self.tokenizer.pad_token_id, config, self.context_limit
        )

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, usage: Usage, adapter: str | None = None
    ) -> AsyncIterator[str]:
        """The response as text deltas (on `adapter`, if given); `usage` is filled in as it goes
        (finish_reason last)."""
        if len(prompt_ids) + params.max_tokens > self.context_limit:
            raise UserError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceed the "
                f"context of {self.context_limit} tokens"
            )
        text = TextStream(self.tokenizer, params.stop)
        started = time.perf_counter()
        job = Job(prompt_ids, params, adapter)
        async with aclosing(self.engine.steps(job)) as steps:
            async for step in steps:
                if step.token is not None:
                    if usage.first_token_s is None:
                        usage.first_token_s = time.perf_counter() - started
                        usage.batch_size = self.engine.last_batch_size
                    usage.completion_tokens += 1
                    delta = text.add([step.token])
                    if text.stopped:
                        usage.finish_reason = "stop"
                        yield delta
                        return
                    if delta:
                        yield delta
                if step.finish:
                    usage.finish_reason = step.finish
                    break
        usage.finish_reason = usage.finish_reason or "stop"
        yield text.finish()
