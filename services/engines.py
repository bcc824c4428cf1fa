"""The two ways a model replica batches concurrent requests (`engine.batching`):

- `dynamic`: `@serve.batch` gathers the requests that arrive together; they are prefilled as
  one group and join the rows being decoded (contract/decode.py) at the next step.
- `continuous`: transformers' continuous-batching manager, which admits and retires requests at
  every step over a paged KV cache.

Both give each request its own stream of `Step`s; a consumer that stops listening sets
`Job.done`, and the engine drops the request at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ray import serve

from contract.decode import BatchDecoder, finish_reason
from contract.sampling import SamplingParams
from services.config import EngineConfig

logger = logging.getLogger("ray.serve")


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # the LoRA adapter this request runs on (services/adapters.py); None: the base
    done: bool = False  # set when the consumer stops listening or the request ends; the engine then drops it
    started: bool = False
    produced: int = 0
    steps: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass(frozen=True)
class Step:
    token: int | None  # None when the request ends without a new token
    finish: str | None = None  # "stop" | "length" once the request is done; "error" if decoding failed


class DynamicBatchingEngine:
    """`@serve.batch` gathers the requests that arrive together into one prefill; the group then
    joins the running decode loop between two steps (while it has fewer than max_batch_size
    rows), and each request leaves the loop at the step it ends. A request never waits for a
    whole batch to finish, only for room and the next step."""

    def __init__(self, model, stop_ids: set[int], pad_id: int, config: EngineConfig):
        self._decoder = BatchDecoder(model, pad_id, stop_ids)
        self._stop_ids = stop_ids
        self._max_rows = config.max_batch_size
        self._admit.set_max_batch_size(config.max_batch_size)
        self._admit.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._pending: deque[Job] = deque()
        self._loop: asyncio.Task | None = None
        self._failure: Exception | None = None
        self.waiting = 0
        self.last_batch_size = 0
        # Held by every model call, and by whoever changes the model between two of them (adapters).
        self.model_lock = asyncio.Lock()

    @property
    def running(self) -> int:
        return len(self._decoder.rows)

    def alive(self) -> bool:
        return self._failure is None

    def shutdown(self) -> None:
        """Nothing runs without requests."""

    async def steps(self, job: Job) -> AsyncIterator[Step]:
        if self._failure is not None:
            raise RuntimeError("this replica's decode loop has failed") from self._failure
        self.waiting += 1
        admission = asyncio.ensure_future(self._admit(job))
        try:
            while True:
                step = await job.steps.get()
                if step.finish == "error":
                    raise RuntimeError("this replica's decode loop has failed") from self._failure
                yield step
                if step.finish:
                    return
        finally:
            job.done = True
            if not job.started:
                self.waiting -= 1
            admission.cancel()

    @serve.batch(max_batch_size=32)
    async def _admit(self, jobs: list[Job]) -> list[None]:
        self._pending.extend(jobs)
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._decode_loop())
        return [None] * len(jobs)

    async def _decode_loop(self) -> None:
        jobs: dict[int, Job] = {}  # decoder row -> its job
        group: list[Job] = []
        try:
            while True:
                if group := self._take_pending(self._max_rows - len(jobs)):
                    for job in group:  # before the prefill, which a client may leave during
                        job.started = True
                    self.waiting -= len(group)
                    async with self.model_lock:
                        rows, tokens = await asyncio.to_thread(
                            self._decoder.add,
                            [j.prompt_ids for j in group],
                            [j.params for j in group],
                            [j.adapter for j in group],
                        )
                    jobs.update(zip(rows, group))
                    self._deliver(jobs, rows, tokens)
                for row in [r for r, j in jobs.items() if j.done]:
                    del jobs[row]
                self._decoder.keep([r for r in self._decoder.rows if r in jobs])
                if not jobs:
                    if self._pending:
                        continue
                    return
                self.last_batch_size = len(jobs)
                async with self.model_lock:
                    tokens = await asyncio.to_thread(self._decoder.step)
                self._deliver(jobs, self._decoder.rows, tokens)
        except Exception as e:  # every waiting consumer is told; the health check then replaces the replica
            logger.exception("the decode loop failed")
            self._failure = e
            for job in [*jobs.values(), *group, *self._pending]:  # a job told twice stops at the first
                job.steps.put_nowait(Step(None, "error"))

    def _take_pending(self, room: int) -> list[Job]:
        group = []
        while self._pending and len(group) < room:
            job = self._pending.popleft()
            if not job.done:  # its client left while it waited
                group.append(job)
        return group

    def _deliver(self, jobs: dict[int, Job], rows: list[int], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            job = jobs[row]
            if job.done:
                continue
            finish = finish_reason(token, job.produced, self._stop_ids, job.params.max_tokens)
            if finish != "stop":
                job.produced += 1
            step = Step(None if finish == "stop" else token, finish)
            job.steps.put_nowait(step)
            job.done = step.finish is not None


_PAGE = 256  # tokens per KV-cache page in continuous batching (transformers' default)
# The manager samples every row (do_sample is one setting for all its requests), so a greedy row
# is sampled at this temperature. Dividing by a power of two is exact and stretches every gap
# between two logits by 2**100: softmax leaves all the mass on the largest, and the draw is the
# argmax (exact ties aside).
_GREEDY_TEMPERATURE = 2.0**-100


class ContinuousBatchingEngine:
    """transformers' manager draws from one random stream for all requests: a per-request seed
    cannot be honoured, and the ingress refuses one when this engine is configured. Its warpers
    are fixed when it starts; a request can only change their values. Top-k is one of them only
    with `engine.continuous_top_k`, since its warper sorts the whole vocabulary per row per token
    for every request, asked for or not."""

    def __init__(self, model, stop_ids: set[int], pad_id: int, config: EngineConfig, context_limit: int):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self._stop_ids = sorted(stop_ids)
        self._vocab = model.config.vocab_size
        self._top_k = config.continuous_top_k
        # Per-request temperature, top-p and top-k exist only for warpers the base config turns
        # on; these base values switch them on and every request overrides them.
        base = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_p=0.5,
            top_k=self._vocab if self._top_k else None,
            eos_token_id=self._stop_ids,
            pad_token_id=pad_id,
        )
        # transformers sizes the KV cache from free device memory; on a CPU that is most of the
        # host's RAM (14 GB and 45 s before the first token, measured with a 14M model), so
        # there it gets room for max_batch_size full contexts instead.
        sizing = (
            {}
            if model.device.type == "cuda"
            else dict(num_blocks=math.ceil(config.max_batch_size * context_limit / _PAGE), page_size=_PAGE, max_batch_tokens=512)
        )
        self._manager = model.init_continuous_batching(
            generation_config=base,
            continuous_batching_config=ContinuousBatchingConfig(
                per_request_processors=True, max_requests_per_batch=config.max_batch_size, allow_block_sharing=False, **sizing
            ),
        )
        self._manager.start()
        self.running = 0
        self.waiting = 0
        self.last_batch_size = 0

    def alive(self) -> bool:
        return self._manager.is_running()

    async def steps(self, job: Job) -> AsyncIterator[Step]:
        p = job.params
        outputs: asyncio.Queue = asyncio.Queue()
        request_id = uuid.uuid4().hex
        self._manager.register_result_handler(request_id, outputs.put_nowait)
        sampling = {"temperature": float(p.temperature) or _GREEDY_TEMPERATURE, "top_p": float(p.top_p)}
        if p.top_k or self._top_k:  # a manager without the top-k warper refuses the key: never ignored
            sampling["top_k"] = p.top_k or self._vocab
        self._manager.add_request(
            job.prompt_ids,
            request_id=request_id,
            max_new_tokens=p.max_tokens,
            streaming=True,
            eos_token_id=self._stop_ids,
            **sampling,
        )
        self.running += 1
        seen = 0
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                if output.error:
                    raise RuntimeError(f"continuous batching failed: {output.error}")
                finished = output.is_finished()
                self.last_batch_size = self.running
                for token in output.generated_tokens[seen:]:
                    finish = finish_reason(token, seen, self._stop_ids, p.max_tokens)
                    if finish == "stop":
                        yield Step(None, "stop")
                        return
                    seen += 1
                    yield Step(token, finish)
                    if finish:
                        return
            yield Step(None, "stop")
        finally:
            self.running -= 1
            if not finished:
                self._manager.cancel_request(request_id)
            job.done = True

    def shutdown(self) -> None:
        self._manager.stop(block=True, timeout=10)


def make_engine(model, stop_ids: set[int], pad_id: int, config: EngineConfig, context_limit: int):
    if config.batching == "dynamic":
        return DynamicBatchingEngine(model, stop_ids, pad_id, config)
    return ContinuousBatchingEngine(model, stop_ids, pad_id, config, context_limit)
