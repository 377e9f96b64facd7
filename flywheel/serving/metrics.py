"""Prometheus metrics of one app (its own registry, so two apps in a process never mix), and the
middleware that counts and times every request by endpoint, method and status."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flywheel.serving.champion import Reload

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "flywheel_requests",
            "HTTP requests by endpoint, method and status code.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flywheel_request_duration_seconds",
            "Request latency by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "flywheel_predictions",
            "Texts classified, by predicted label.",
            ["label"],
            registry=self.registry,
        )
        self.truncated = Counter(
            "flywheel_truncated_texts", "Texts cut to serve.max_text_chars.", registry=self.registry
        )
        self.feedback = Counter(
            "flywheel_feedback",
            "Feedback received: created (new) or duplicate (id seen before).",
            ["result"],
            registry=self.registry,
        )
        self.model_version = Gauge(
            "flywheel_model_version", "Registry version being served.", registry=self.registry
        )
        self.reloads = Counter(
            "flywheel_model_reloads",
            "Champion checks: swapped, unchanged or failed (old model kept).",
            ["result"],
            registry=self.registry,
        )
        self.model_calls = Histogram(
            "flywheel_model_call_texts",
            "Texts per model call (more than a request's when requests are batched).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.log_errors = Counter(
            "flywheel_prediction_log_errors",
            "Predictions answered but not written to the prediction log.",
            registry=self.registry,
        )

    def on_reload(self, result: Reload | None) -> None:
        if result is None:
            self.reloads.labels("failed").inc()
            return
        self.reloads.labels("swapped" if result.changed else "unchanged").inc()
        if result.current.isdigit():
            self.model_version.set(int(result.current))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Every request counted and timed under its route's path (`unmatched`: no route).

    Plain ASGI, not Starlette's BaseHTTPMiddleware, which runs each request's app in a task of
    its own and passes the response through a memory stream."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
