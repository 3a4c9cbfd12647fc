"""Prometheus metrics of the consumer, and the tiny HTTP server for ``/metrics`` and ``/healthz``.

The hot path only increments in-process counters (no I/O per mail); what needs a server
(queue depth from beanstalkd's ``stats-tube``, whether MongoDB answers) is polled by the
consumer's heartbeat every few seconds and merely read at scrape time.

``prometheus_client`` is the ``metrics`` extra: it is imported only when a
:class:`ConsumerMetrics` is made, so a producer-only install never needs it. Delivery counts
through :class:`Tally`, whose methods do nothing, when metrics are off.

The server is plain ``asyncio`` on the consumer's own loop: a scrape then sees the loop's
state without locks, and a loop that stands still fails the health check, as it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import Metric

__all__ = ["BREAKER_STATES", "ConsumerMetrics", "MetricsServer", "Tally", "breaker_state", "health_problem"]

log = logging.getLogger("mailer.metrics")

#: The values of ``mailer_vendor_state``.
BREAKER_STATES = {"available": 0, "unavailable": 1, "probing": 2, "throttled": 3}
ERROR_CLASSES = ("transient", "throttled", "auth", "permanent", "unsupported", "unknown")
QUEUE_STATES = ("ready", "reserved", "delayed", "buried")
# A vendor call is 1 ms (simulated) to several seconds (a slow relay at its timeout).
CALL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Created -> sent spans a hot queue (ms) to retries with back-off (hours).
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_S = 5.0


def breaker_state(until: float, reason: str, now: float, *, throttle_prefix: str) -> int:
    """A vendor's state from its shared mark: a mark in force is an outage or a throttle;
    one that ran out but is still recorded waits for (or is) its half-open probe."""
    if until > now:
        return BREAKER_STATES["throttled" if reason.startswith(throttle_prefix) else "unavailable"]
    if until > 0 and not reason.startswith(throttle_prefix):
        return BREAKER_STATES["probing"]
    return BREAKER_STATES["available"]


class Tally:
    """Where delivery counts outcomes; this base counts nothing (metrics off, and tests)."""

    def sent(self, vendor: str, created: dt.datetime | None) -> None:
        """A mail went out through ``vendor``; ``created`` is when it was stored."""

    def failed(self, vendor: str) -> None:
        """A mail was given up (``vendor``: the last one tried, ``-`` for none)."""

    def retried(self, vendor: str) -> None:
        """A mail was put back for a later round."""

    def vendor_error(self, vendor: str, error_class: str) -> None:
        """One failed vendor call, by class (:data:`ERROR_CLASSES`)."""

    def vendor_call(self, vendor: str, seconds: float) -> None:
        """How long one vendor call took, whatever its outcome."""


class ConsumerMetrics(Tally):
    """The consumer's metrics in a registry of their own (so tests can make many)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.clock = clock
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.mails_sent: Counter = Counter(
            "mailer_mails_sent", "Mails sent, by vendor", ["vendor"], registry=r
        )
        self.mails_failed: Counter = Counter(
            "mailer_mails_failed", "Mails given up, by the last vendor tried", ["vendor"], registry=r
        )
        self.mails_retried: Counter = Counter(
            "mailer_mails_retried",
            "Mails put back for a later round, by the last vendor tried",
            ["vendor"],
            registry=r,
        )
        self.vendor_errors: Counter = Counter(
            "mailer_vendor_errors",
            "Failed vendor calls, by vendor and class",
            ["vendor", "class"],
            registry=r,
        )
        self.call_seconds: Histogram = Histogram(
            "mailer_vendor_call_seconds",
            "Duration of one vendor call",
            ["vendor"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.latency_seconds: Histogram = Histogram(
            "mailer_mail_latency_seconds",
            "From a mail's creation to its send",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight: Gauge = Gauge("mailer_deliveries_in_flight", "Mails with a vendor now", registry=r)
        self.queue_jobs: Gauge = Gauge(
            "mailer_queue_jobs", "Jobs of the tube, by state", ["state"], registry=r
        )
        self._breakers: Callable[[], Mapping[str, int]] = dict

    # --- the hot path: in-process counters only ----------------------------------------

    def sent(self, vendor: str, created: dt.datetime | None) -> None:
        self.mails_sent.labels(vendor).inc()
        if created is not None:
            self.latency_seconds.observe(max(0.0, self.clock() - created.timestamp()))

    def failed(self, vendor: str) -> None:
        self.mails_failed.labels(vendor).inc()

    def retried(self, vendor: str) -> None:
        self.mails_retried.labels(vendor).inc()

    def vendor_error(self, vendor: str, error_class: str) -> None:
        self.vendor_errors.labels(vendor, error_class).inc()

    def vendor_call(self, vendor: str, seconds: float) -> None:
        self.call_seconds.labels(vendor).observe(seconds)

    # --- read at scrape time, or set by the heartbeat ----------------------------------

    def watch(self, *, in_flight: Callable[[], int], breakers: Callable[[], Mapping[str, int]]) -> None:
        """Read these at each scrape: both are in-process state, no I/O."""
        self.in_flight.set_function(in_flight)
        self._breakers = breakers
        self.registry.register(_BreakerCollector(self))

    def queue_depth(self, stats: Mapping[str, object]) -> None:
        """Adopt a ``stats-tube`` answer (an unused tube has none: every state is 0)."""
        for state in QUEUE_STATES:
            value = stats.get(f"current-jobs-{state}", 0)
            self.queue_jobs.labels(state).set(value if isinstance(value, int) else 0)

    def scrape(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _BreakerCollector:
    """``mailer_vendor_state{vendor}``, computed from the registry at each scrape."""

    def __init__(self, metrics: ConsumerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        states = ", ".join(f"{v} {k}" for k, v in BREAKER_STATES.items())
        family = GaugeMetricFamily(
            "mailer_vendor_state", f"Each vendor's breaker: {states}", labels=["vendor"]
        )
        for vendor, state in self.metrics._breakers().items():
            family.add_metric([vendor], state)
        yield family


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` (200 or 503 with the reason).

    ``health`` returns None when healthy, else what is wrong. One request per connection:
    a scraper every few seconds needs no keep-alive, and closing keeps the server small.
    """

    def __init__(
        self, host: str, port: int, scrape: Callable[[], bytes], health: Callable[[], str | None]
    ) -> None:
        self.host, self.port = host, port
        self._scrape, self._health = scrape, health
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]  # the real one when 0 was asked
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            status, ctype, body = self._answer(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        try:
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        method, _, rest = head[:MAX_REQUEST_HEAD].partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method != b"GET":
            return "405 Method Not Allowed", "text/plain", b"use GET\n"
        if path == b"/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            return "200 OK", CONTENT_TYPE_LATEST, self._scrape()
        if path == b"/healthz":
            problem = self._health()
            if problem is None:
                return "200 OK", "text/plain", b"ok\n"
            return "503 Service Unavailable", "text/plain", f"unhealthy: {problem}\n".encode()
        return "404 Not Found", "text/plain", b"GET /metrics or /healthz\n"


def health_problem(
    *, loops_running: bool, answered: Mapping[str, float], now: float, within_s: float
) -> str | None:
    """None while the loops run and each server answered within ``within_s``; else why not."""
    if not loops_running:
        return "the reserve loops are not running"
    late = [name for name, at in answered.items() if now - at > within_s]
    if late:
        return ", ".join(f"{name} has not answered for {within_s:.0f} s" for name in late)
    return None
