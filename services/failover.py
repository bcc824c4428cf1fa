"""One request's answer across lost model replicas.

A model replica can be lost at any moment: killed, out of memory, its node preempted. Serve's
handle then raises ActorDiedError or ActorUnavailableError (both RayActorError) for each request
the replica held. The ingress still has everything such a request needs: its prompt, and the
text that had come back. So it sends the request again, to a live replica, with that text
appended to the prompt and the tokens left as its budget: the answer goes on where it stopped,
and the client, streamed or not, never knows. A greedy answer goes on as it would have; a
sampled one as another sample from that point on (a seeded answer is then no longer the seed's,
and the penalties count only the tokens after the resumption).

After `deployment.lost_replica_retries` resends, ReplicaLost: the ingress answers 503 with
Retry-After while nothing has left, and ends a begun stream with an error event.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from contract.sampling import SamplingParams
from services.metrics import IngressMetrics

logger = logging.getLogger("ray.serve")


class ReplicaLost(Exception):
    """Every replica tried for this request was lost (or, on a resend, overloaded)."""


class Failover:
    """The model's events for one request ({"text", "completion_tokens"} ..., then one with
    "finish_reason"), the tokens counted across resends on a lost replica: an async iterator with
    cancel(), like the handle's own response."""

    def __init__(
        self,
        model: DeploymentHandle,
        tokenize: Callable[[str], list[int]],
        prompt_ids: list[int],
        params: SamplingParams,
        interval_s: float,
        retries: int,
        metrics: IngressMetrics,
        request_id: str,
    ):
        self._model, self._tokenize, self._prompt_ids, self._params = model, tokenize, prompt_ids, params
        self._interval_s, self._retries, self._metrics, self._id = interval_s, retries, metrics, request_id
        self._current = None
        self._events = self._run()

    def __aiter__(self) -> Failover:
        return self

    def __anext__(self):
        return self._events.__anext__()

    def cancel(self) -> None:
        if self._current is not None:
            self._current.cancel()

    async def _run(self) -> AsyncIterator[dict]:
        text, begun = "", []  # what has come back, and its tokens once a resend needs them
        for attempt in range(self._retries + 1):
            params = dataclasses.replace(
                self._params,
                max_tokens=self._params.max_tokens - len(begun),
                min_tokens=max(self._params.min_tokens - len(begun), 0),
            )
            if params.max_tokens <= 0:  # lost just as the budget ran out
                yield {"text": "", "finish_reason": "length", "completion_tokens": len(begun)}
                return
            self._current = self._model.options(stream=True).generate.remote(self._prompt_ids + begun, params, self._interval_s)
            try:
                async for event in self._current:
                    text += event["text"]
                    yield event | {"completion_tokens": len(begun) + event["completion_tokens"]}
                    if "finish_reason" in event:
                        return
            except BackPressureError:
                if attempt == 0:
                    raise  # nothing was admitted: the ingress answers 503, overloaded
                self._metrics.failed("overloaded_on_resend")
                raise ReplicaLost("the model replica answering was lost, and the others are busy") from None
            except RayActorError as e:
                if attempt == self._retries:
                    self._metrics.failed("replica_lost")
                    raise ReplicaLost(f"the model replica answering was lost, on {attempt + 1} tries") from None
                cause = "replica_lost_mid_answer" if text else "replica_lost"
                self._metrics.retried(cause)
                logger.warning("%s: its model replica was lost (%s, %s); sending it again", self._id, e.__class__.__name__, cause)
                begun = self._tokenize(text) if text else []
