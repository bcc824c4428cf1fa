"""Prometheus metrics through Ray Serve's metrics API, which tags every series with the
application, deployment and replica. Ray exports them with a `ray_` prefix from each node's
metrics agent; services/grafana/dolly.json charts them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection

from ray.serve import metrics

_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class IngressMetrics:
    def __init__(self):
        self.requests = metrics.Counter(
            "dolly_requests",
            description="HTTP requests answered, by endpoint and status code (errors: code >= 400)",
            tag_keys=("endpoint", "code"),
        )
        self.latency = metrics.Histogram(
            "dolly_request_latency_s",
            description="time from request to last byte",
            boundaries=_LATENCY_BUCKETS,
            tag_keys=("endpoint",),
        )

        self.retries = metrics.Counter(
            "dolly_retried_requests",
            description="requests sent again after their replica was lost, by cause (the model replica's: replica_lost, "
            "replica_lost_mid_answer; the ingress's, a stream cut and its rest asked for by the client: "
            "stream_cut_resumed_by_client)",
            tag_keys=("cause",),
        )
        self.feedback = metrics.Counter(
            "dolly_feedback",
            description="ratings and written answers sent from the chat page, by rating and model version",
            tag_keys=("rating", "corrected", "version"),
        )
        self.failures = metrics.Counter(
            "dolly_failed_requests",
            description="requests that got no whole answer, by cause (overloaded, replica_lost, overloaded_on_resend)",
            tag_keys=("cause",),
        )

    def rated(self, rating: str | None, corrected: bool, version: str) -> None:
        self.feedback.inc(tags={"rating": rating or "none", "corrected": str(corrected).lower(), "version": version})

    def retried(self, cause: str) -> None:
        self.retries.inc(tags={"cause": cause})

    def failed(self, cause: str) -> None:
        self.failures.inc(tags={"cause": cause})

    def answered(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "code": str(code)})
        self.latency.observe(seconds, tags={"endpoint": endpoint})


class RecordedAnswers:
    """An ASGI app that counts every answer of the one it wraps by endpoint and status code, and
    times it to its last byte; a client that leaves before the end is counted as 499, as nginx
    does. A path that is none of `endpoints` counts as "other", so that stray requests do not grow
    the metric's labels without bound."""

    def __init__(self, app, metrics: IngressMetrics, endpoints: Collection[str]):
        self._app, self._metrics, self._endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, recording_send)
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            path = scope["path"].removeprefix(scope.get("root_path", ""))  # under a route_prefix
            endpoint = path if path in self._endpoints else "other"
            self._metrics.answered(endpoint, status, time.perf_counter() - started)


class ModelMetrics:
    def __init__(self):
        self.ttft = metrics.Histogram(
            "dolly_time_to_first_token_s",
            description="time from a replica receiving a request to its first token",
            boundaries=_LATENCY_BUCKETS,
        )
        self.output_tokens = metrics.Counter("dolly_output_tokens", description="tokens generated (rate: output tokens/s)")
        self.batch_size = metrics.Histogram(
            "dolly_batch_size", description="requests decoded together, as each request saw it", boundaries=_BATCH_BUCKETS
        )
        self.queue_length = metrics.Gauge("dolly_queue_length", description="requests in a replica waiting for a batch")
        self.running = metrics.Gauge("dolly_running_requests", description="requests a replica is decoding")
        self.cancelled = metrics.Counter("dolly_cancelled_requests", description="generations stopped because the client left")
