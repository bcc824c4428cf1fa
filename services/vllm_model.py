"""The model deployment on vLLM (`engine.kind=vllm`): Ray Serve LLM's LLMServer, the deployment
`ray.serve.llm` serves with, under the same ingress as our own engine.

The ingress stays ours (API keys, the Dolly prompt fitted to the context, `/v1/feedback`, the
error bodies, our metrics), so a client meets the same API whichever engine answers. It sends a
replica the prompt's token ids and our sampling parameters; the replica asks LLMServer for a
completion of those ids, with Dolly's stop tokens as vLLM's `stop_token_ids`, and turns the
token ids that come back into text by the same rule as our engine (services/text.py): the answer
ends at `### End`, at `### Instruction:` and at the request's stop strings. Events leave as
DollyModel's do, so a replica lost mid-answer is resumed the same way (services/failover.py).

What vLLM brings: a paged KV cache with admission control (a request waits for room instead of
failing every one in flight), continuous batching with chunked prefill, prefix caching, tensor
parallelism, its engine metrics (`log_engine_metrics`, beside our dolly_* ones), and multi-LoRA:
with `adapters`, the ingress sends an adapter's version as the multiplexed model id, as it does to
our engine, and LLMServer loads it through Serve's multiplexing (at most
`deployment.max_adapters_per_replica` a replica) from our registry (RegistryAdapters).

Imported only with engine.kind=vllm, in vLLM's own environment (`make vllm`): `ray.serve.llm`
needs vLLM, which pins a transformers that training's does not meet.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from ray import serve
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig  # what LLMServer's loader returns
from ray.serve.llm import LLMConfig
from ray.serve.llm.deployment import LLMServer
from ray.serve.llm.openai_api_models import CompletionRequest

from contract import registry
from contract.models import load_tokenizer, stop_token_ids
from contract.sampling import SamplingParams
from contract.settings import merge
from services.config import ServeConfig
from services.metrics import ModelMetrics
from services.text import TextStream


class RegistryAdapters:
    """LLMServer's adapter loader (its `model_downloader`), reading an adapter version in place from
    our registry (a local folder, NFS or a PVC): Ray Serve LLM's own loader copies adapters from
    cloud storage only (LoraConfig.dynamic_lora_loading_path takes s3://, gs:// or azure://)."""

    def __init__(self, root: str, **_):  # LLMServer passes its download timeout and tries: nothing is downloaded
        self._root, self._ids = Path(root), itertools.count(1)

    async def load_model_from_config(self, lora_model_id: str, llm_config: LLMConfig) -> DiskMultiplexConfig:
        folder, _ = registry.resolve(lora_model_id, self._root)
        return DiskMultiplexConfig(
            model_id=lora_model_id, max_total_tokens=None, local_path=str(folder), lora_assigned_int_id=next(self._ids)
        )


class VLLMModel(LLMServer):
    async def __init__(self, llm_config: LLMConfig, folder: str, registry_root: str):
        await super().__init__(llm_config, model_downloader=functools.partial(RegistryAdapters, registry_root))
        self._tokenizer = load_tokenizer(folder)
        self._stop_ids = stop_token_ids(Path(folder), self._tokenizer)
        self._metrics = ModelMetrics()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, interval_s: float) -> AsyncIterator[dict]:
        """DollyModel.generate's events: {"text", "completion_tokens"} (tokens so far) at most every
        interval_s, then one with "finish_reason"."""
        request = CompletionRequest(
            model=serve.get_multiplexed_model_id() or self._llm_config.model_id,  # an adapter's version, set by the ingress
            prompt=prompt_ids,
            stream=True,
            return_token_ids=True,  # the text is made here, by our rule, from the ids
            max_tokens=params.max_tokens,
            min_tokens=params.min_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or -1,  # vLLM's "off"
            seed=params.seed,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            stop_token_ids=sorted(self._stop_ids),
        )
        text, tokens, finish = TextStream(self._tokenizer, params.stop), 0, None
        pending, sent_at, started, first_s = "", None, time.perf_counter(), None
        stream = await self.completions(request)
        try:
            async for batch in stream:
                for ids, finish in _chunks(batch):
                    if finish == "stop":  # vLLM returns the stop token; our engine counts none
                        ids = [i for i in ids if i not in self._stop_ids]
                    if ids and first_s is None:
                        first_s = time.perf_counter() - started
                    tokens += len(ids)
                    pending += text.add(ids)
                    if text.stopped:
                        finish = "stop"
                    if finish:
                        break
                    now = time.perf_counter()
                    if pending and (sent_at is None or now - sent_at >= interval_s):
                        yield {"text": pending, "completion_tokens": tokens}
                        pending, sent_at = "", now
                if finish:
                    break
        except (asyncio.CancelledError, GeneratorExit):
            self._metrics.cancelled.inc()
            raise
        finally:
            await stream.aclose()  # vLLM aborts a request whose stream closes: its KV blocks free at once
            if first_s is not None:
                self._metrics.output_tokens.inc(tokens)
                self._metrics.ttft.observe(first_s)
        yield {"text": pending + text.finish(), "finish_reason": finish or "stop", "completion_tokens": tokens}


def _chunks(batch) -> Iterator[tuple[list[int], str | None]]:
    """(new token ids, finish reason or None) of each of LLMServer's stream items: a list of SSE
    strings ("data: {...}\\n\\n"), or an error response."""
    for item in batch if isinstance(batch, list) else [batch]:
        if not isinstance(item, str):  # ErrorResponse: refused before any token
            raise RuntimeError(f"vLLM refused the request: {getattr(item, 'error', item)}")
        # "\n" only: splitlines() also breaks at U+2028, U+0085 and the like, which JSON leaves raw
        # inside a string (the bench's random model generated one, and the chunk's JSON split).
        for line in item.split("\n"):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"vLLM failed the request: {chunk['error'].get('message', chunk['error'])}")
            for choice in chunk["choices"]:
                yield choice.get("token_ids") or [], choice.get("finish_reason")


def llm_config(config: ServeConfig, folder: Path, context: int) -> LLMConfig:
    """Ray Serve LLM's config for `folder`: what this ServeConfig says (replicas, autoscaling,
    queues, health, context, dtype, GPUs, adapters), under the LLMConfig settings of `engine.vllm`
    (e.g. engine_kwargs.max_lora_rank for adapters of a rank above vLLM's 16)."""
    e, gpus = config.engine, int(config.deployment.num_gpus)
    options = config.model_deployment_options()
    # A replica's GPUs are its engine's placement bundles (one per tensor-parallel rank), not the actor's.
    options["ray_actor_options"] = {"num_cpus": config.deployment.num_cpus}
    derived = {
        "model_loading_config": {"model_id": config.served_model_name or folder.name, "model_source": str(folder)},
        "accelerator_config": {"kind": "gpu" if gpus else "cpu"},
        "engine_kwargs": {
            "max_model_len": context,
            "max_num_seqs": e.max_batch_size,
            "tensor_parallel_size": max(gpus, 1),
            # vLLM's auto is ours on GPUs (bfloat16 where computed natively, else float16); on the
            # CPU ours is float32, so both engines give the same answers.
            "dtype": "float32" if e.dtype == "auto" and not gpus else e.dtype,
        },
        "deployment_config": options,
    }
    if config.adapters:
        held = config.deployment.max_adapters_per_replica
        derived["lora_config"] = {"max_num_adapters_per_replica": held}  # Serve's multiplexing; RegistryAdapters loads
        derived["engine_kwargs"] |= {"enable_lora": True, "max_loras": held}
    return LLMConfig.model_validate(merge(derived, e.vllm))


def vllm_deployment(config: ServeConfig, folder: Path, context: int):
    """The model deployment, bound, for services/app.py."""
    llm = llm_config(config, folder, context)
    deployment = serve.deployment(VLLMModel, name="VLLMModel").options(**VLLMModel.get_deployment_options(llm))
    return deployment.bind(llm, str(folder), str(config.registry.resolve()))
