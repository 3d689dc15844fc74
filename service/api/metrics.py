"""Prometheus metrics of one app, and the middleware that counts and times its requests.

Each process keeps its own registry: with ``--workers N`` every worker reports
only what it served.
"""

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.api.guards import REFUSAL_REASONS
from service.core.batching import BatchStats
from service.errors import OverloadedError

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_QUEUE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Metrics:
    """Prometheus metrics of one app, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lensserve_requests",
            "HTTP requests answered, by route and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lensserve_errors",
            "Errors by code: whole requests refused and single files refused within a request.",
            ["code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lensserve_request_duration_seconds",
            "Time from request start to the end of the response (seconds).",
            ["route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.cutouts = Counter(
            "lensserve_cutouts_processed",
            "Cutouts answered with predictions.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "lensserve_batch_size_cutouts",
            "Cutouts per onnxruntime batch (cutouts).",
            buckets=_BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "lensserve_queue_time_seconds",
            "Time a request waited in the batcher before its batch ran (seconds).",
            buckets=_QUEUE_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_time = Histogram(
            "lensserve_batch_duration_seconds",
            "Time to run one batch through the three models and summarise it (seconds).",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.ready = Gauge(
            "lensserve_ready", "1 once the models are loaded and warmed up.", registry=self.registry
        )
        self.queued = Gauge(
            "lensserve_queued_cutouts",
            "Cutouts waiting for a batch (cutouts).",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "lensserve_requests_in_flight",
            "POST requests under /v1 and /v2 being handled (requests).",
            registry=self.registry,
        )
        self.admitted_cutouts = Gauge(
            "lensserve_admitted_cutouts",
            "Cutouts of the admitted requests not yet answered, estimated from Content-Length "
            "until their body is read (cutouts).",
            registry=self.registry,
        )
        self.expected_wait = Gauge(
            "lensserve_expected_queue_wait_seconds",
            "Admitted cutouts times the measured service time per cutout: what admission "
            "compares with LENSSERVE_MAX_QUEUE_WAIT_S (seconds).",
            registry=self.registry,
        )
        self.refusals = Counter(
            "lensserve_admission_refusals",
            "POST requests refused with 503 before their body was read, by reason: "
            "queue_wait, body_bytes, requests.",
            ["reason"],
            registry=self.registry,
        )
        # Bound once: a refusal then costs two counter increments, no label lookup.
        self._refusal_counters = {
            reason: self.refusals.labels(reason=reason) for reason in REFUSAL_REASONS
        }
        self._overloaded_errors = self.errors.labels(code=OverloadedError.code)

    def count_refusal(self, reason: str) -> None:
        """Count one admission refusal (``reason`` one of ``REFUSAL_REASONS``)."""
        self._refusal_counters[reason].inc()
        self._overloaded_errors.inc()

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_time.observe(stats.run_s)
        for wait_s in stats.queue_times_s:
            self.queue_time.observe(wait_s)


_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class MetricsMiddleware:
    """Counts requests by route and status and times them (a plain ASGI middleware)."""

    def __init__(
        self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]], metrics: Metrics
    ) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # An exception leaves no response here (Starlette sends its 500 further out); a
        # request whose client went away ends with none either: nginx's 499.
        status: int | None = None
        raised = True

        async def send_with_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
            raised = False
        finally:
            if status is None:
                status = 500 if raised else 499
            route = scope.get("route")
            # Route templates, not raw paths, keep the label set small.
            name = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(
                method=scope.get("method", ""), route=name, status=str(status)
            ).inc()
            self.metrics.latency.labels(route=name).observe(time.perf_counter() - started)
