"""The API's own Prometheus metrics: requests by route and status, and their latency.

A pure ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, which runs each
request in an extra task and would cost the send path measurably; it labels by the route's
template (``/v1/emails/{mail_id}``), never the raw path, so ids do not explode the series.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailer.service.auth import authorize

__all__ = ["ApiMetrics", "MetricsMiddleware", "scrape"]

UNMATCHED = "unmatched"  # a path no route has (404): one series for all of them
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """The API's metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mailer_api_requests",
            "HTTP requests, by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "mailer_api_request_seconds",
            "Time to answer an HTTP request, by route",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.seconds.labels(route).observe(seconds)


class MetricsMiddleware:
    """Counts every HTTP request once its response has started (or failed)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)
            self.metrics.observe(route, scope["method"], status, time.perf_counter() - t0)


def _metrics_of(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


scrape = APIRouter(dependencies=[Depends(authorize)])


@scrape.get("/metrics", include_in_schema=False)
async def metrics(api_metrics: Annotated[ApiMetrics, Depends(_metrics_of)]) -> Any:
    """Prometheus text; it needs the API key like every route but the probes."""
    return Response(generate_latest(api_metrics.registry), media_type=CONTENT_TYPE_LATEST)
