"""The model deployment: replicas that each hold the model and batch what they are sent; with
`adapters`, the base and the LoRA adapters that requests name (services/adapters.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, nullcontext
from pathlib import Path

from ray import serve

from contract.devices import ray_gpu_ids
from contract.sampling import SamplingParams
from services.adapters import AdapterPool
from services.config import ServeConfig
from services.generator import TextGenerator, Usage
from services.metrics import ModelMetrics


@serve.deployment(name="DollyModel")
class DollyModel:
    def __init__(self, folder: str, config: ServeConfig, adapter: str | None = None, base: str | None = None):
        """`folder`'s model; with `adapter` (its version) and `base`, the adapter in `folder` on
        that base, which other adapters on the same base then join as requests name them."""
        self._generator = TextGenerator(Path(folder), config.engine, adapter)
        self._metrics = ModelMetrics()
        self._cancelled = 0
        self._pool = None
        if adapter is not None:
            engine = self._generator.engine
            self._pool = AdapterPool(self._generator.model, engine.model_lock, config.registry, base)

            async def load_adapter(version: str):
                return await self._pool.load(version)

            # Wired here, not as a decorated method, since the bound is a setting; on a plain function,
            # where Serve keeps its cache (a bound method cannot hold it).
            self._adapter = serve.multiplexed(max_num_models_per_replica=config.deployment.max_adapters_per_replica)(load_adapter)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, interval_s: float) -> AsyncIterator[dict]:
        """{"text", "completion_tokens"} events (tokens so far), then one with "finish_reason". The first text goes
        out at once, later text at most every interval_s: each event is a Ray round trip, and one
        per token for a whole batch would take the CPU from decoding."""
        usage = Usage()
        pending, sent_at = "", None
        self._observe_load()
        version = serve.get_multiplexed_model_id()  # an adapter's, set by the ingress; "" for the base
        adapter = await self._adapter(version) if version else None
        try:
            with adapter.in_use() if adapter else nullcontext():
                async with aclosing(self._generator.generate(prompt_ids, params, usage, version or None)) as deltas:
                    async for delta in deltas:
                        pending += delta
                        now = time.perf_counter()
                        if pending and (sent_at is None or now - sent_at >= interval_s):
                            yield {"text": pending, "completion_tokens": usage.completion_tokens}
                            pending, sent_at = "", now
        except (asyncio.CancelledError, GeneratorExit):
            self._cancelled += 1
            self._metrics.cancelled.inc()
            raise
        finally:
            if usage.first_token_s is not None:
                self._metrics.output_tokens.inc(usage.completion_tokens)
                self._metrics.ttft.observe(usage.first_token_s)
                self._metrics.batch_size.observe(usage.batch_size)
            self._observe_load()
        yield {"text": pending, "finish_reason": usage.finish_reason, "completion_tokens": usage.completion_tokens}

    def stats(self) -> dict:
        """Requests waiting for a batch, being decoded, and cancelled by their client so far; the
        adapters held; where the replica runs (the GPUs Ray gave it, and the device it uses)."""
        engine = self._generator.engine
        held = self._pool.held if self._pool else []
        where = {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "gpu_ids": ray_gpu_ids(),
            "device": str(self._generator.device),
        }
        return {"waiting": engine.waiting, "running": engine.running, "cancelled": self._cancelled, "adapters": held} | where

    def check_health(self) -> None:
        if not self._generator.engine.alive():
            raise RuntimeError("the batching engine stopped: this replica will be replaced")

    def __del__(self) -> None:
        # Serve calls this when it stops the replica, after in-flight requests had their grace period.
        self._generator.engine.shutdown()

    def _observe_load(self) -> None:
        stats = self.stats()
        self._metrics.queue_length.set(stats["waiting"])
        self._metrics.running.set(stats["running"])
