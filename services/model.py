"""The model deployment: replicas that each hold the model and batch what they are sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

from ray import serve

from contract.sampling import SamplingParams
from services.config import ServeConfig
from services.generator import TextGenerator, Usage
from services.metrics import ModelMetrics


@serve.deployment(name="DollyModel")
class DollyModel:
    def __init__(self, folder: str, config: ServeConfig):
        self._generator = TextGenerator(Path(folder), config.engine)
        self._metrics = ModelMetrics()
        self._cancelled = 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams, interval_s: float) -> AsyncIterator[dict]:
        """{"text"} events, then {"text", "finish_reason", "completion_tokens"}. The first text goes
        out at once, later text at most every interval_s: each event is a Ray round trip, and one
        per token for a whole batch would take the CPU from decoding."""
        usage = Usage()
        pending, sent_at = "", None
        self._observe_load()
        try:
            async with aclosing(self._generator.generate(prompt_ids, params, usage)) as deltas:
                async for delta in deltas:
                    pending += delta
                    now = time.perf_counter()
                    if pending and (sent_at is None or now - sent_at >= interval_s):
                        yield {"text": pending}
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
        """Requests waiting for a batch, being decoded, and cancelled by their client so far."""
        engine = self._generator.engine
        return {"waiting": engine.waiting, "running": engine.running, "cancelled": self._cancelled}

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
