"""The consumer's Prometheus /metrics and /healthz (``--metrics-port``), its heartbeat, and
the lazy import of prometheus_client: counters move with real deliveries on the local
servers, the breaker state follows the marks, health turns 503 when the loops stop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import httpx
import pytest
from helpers import FakeClock, free_port, produce, running_consumer, wait_until, with_consumer

from mailer.config import Settings
from mailer.errors import PermanentVendorError, TransientVendorError
from mailer.metrics import BREAKER_STATES, ConsumerMetrics, breaker_state, health_problem
from mailer.routing import THROTTLE_PREFIX
from mailer.store import MailStore
from mailer.vendors.fake import FakeVendor


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a scrape (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts them
    head = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(head + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metered(settings: Settings) -> Settings:
    """A free metrics port, a fast heartbeat and a heartbeat collection of this test's own."""
    return with_consumer(
        settings,
        metrics_port=free_port(),
        heartbeat_s=0.2,
        heartbeat_collection=f"consumers_{uuid.uuid4().hex[:10]}",
    )


async def drop_heartbeats(settings: Settings) -> None:
    async with MailStore(settings) as store:
        await store.consumers.drop()


async def test_metrics_count_real_deliveries_and_health_follows_the_loops(settings: Settings) -> None:
    settings = metered(settings)
    refusing = FakeVendor("mailgun", default=PermanentVendorError("mailgun", "recipient refused"))
    vendors = [FakeVendor("amazon"), refusing]
    try:
        async with running_consumer(settings, vendors, concurrency=2) as consumer:
            port = await wait_until(lambda: consumer.metrics_port, within=10, what="the metrics server")
            assert port == settings.consumer.metrics_port
            await produce(settings, 6)
            await wait_until(lambda: consumer.processed >= 6, within=20, what="6 settled jobs")
            base = f"http://127.0.0.1:{consumer.metrics_port}"
            async with httpx.AsyncClient(base_url=base, timeout=5) as http:
                page = await http.get("/metrics")
                assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
                text = page.text
                # Round robin by job id: each vendor gets some; mailgun refuses every one.
                sent, failed = (
                    sample(text, "mailer_mails_sent_total", vendor="amazon"),
                    sample(text, "mailer_mails_failed_total", vendor="mailgun"),
                )
                assert sent >= 1 and failed >= 1 and sent + failed == 6, text
                permanent = {"vendor": "mailgun", "class": "permanent"}
                errors = sample(text, "mailer_vendor_errors_total", **permanent)
                assert errors == failed
                assert sample(text, "mailer_vendor_call_seconds_count", vendor="amazon") == sent
                assert sample(text, "mailer_mail_latency_seconds_count") == sent
                assert sample(text, "mailer_vendor_state", vendor="amazon") == BREAKER_STATES["available"]
                assert "mailer_deliveries_in_flight 0.0" in text
                # The heartbeat polls stats-tube: all six jobs are gone, the gauges say so.
                for state in ("ready", "reserved", "delayed", "buried"):
                    assert f'mailer_queue_jobs{{state="{state}"}} 0.0' in text, text
                health = await http.get("/healthz")
                assert (health.status_code, health.text) == (200, "ok\n")
                assert (await http.get("/nothing")).status_code == 404
                consumer.stop()
                health = await wait_until(lambda: http.get("/healthz"), within=10, what="a health answer")
                assert health.status_code == 503 and "loops are not running" in health.text
    finally:
        await drop_heartbeats(settings)


async def test_transient_errors_are_counted_by_class_and_the_mail_retried(settings: Settings) -> None:
    settings = with_consumer(metered(settings), backoff_base_s=30.0)
    failing = [FakeVendor(n, default=TransientVendorError(n, "HTTP 503")) for n in ("amazon", "mailgun")]
    try:
        async with running_consumer(settings, failing, concurrency=1) as consumer:
            await produce(settings, 1)
            await wait_until(lambda: consumer.processed >= 1, within=20, what="the job settled")
            assert consumer.metrics is not None
            text = consumer.metrics.scrape().decode()
            for name in ("amazon", "mailgun"):
                assert sample(text, "mailer_vendor_errors_total", vendor=name, **{"class": "transient"}) == 1
                assert sample(text, "mailer_vendor_state", vendor=name) == BREAKER_STATES["unavailable"]
            retried = [sample(text, "mailer_mails_retried_total", vendor=n) for n in ("amazon", "mailgun")]
            assert sum(retried) == 1
            assert 'mailer_queue_jobs{state="delayed"}' in text
    finally:
        await drop_heartbeats(settings)


async def test_the_heartbeat_is_written_and_removed_on_stop(settings: Settings) -> None:
    settings = metered(settings)
    tube = settings.beanstalkd.tube
    try:
        async with MailStore(settings) as store:
            async with running_consumer(settings, [FakeVendor("amazon")], concurrency=1) as consumer:
                live = await wait_until(
                    lambda: store.live_consumers(tube, seen_since=0), within=10, what="a heartbeat"
                )
                assert [d["_id"] for d in live] == [consumer.consumer_id]
                assert live[0]["tube"] == tube and live[0]["pid"] > 0
            assert await store.live_consumers(tube, seen_since=0) == []
    finally:
        await drop_heartbeats(settings)


async def test_a_metrics_port_in_use_is_one_clear_error(settings: Settings) -> None:
    settings = metered(settings)
    from mailer.consumer import Consumer
    from mailer.errors import ConfigError

    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    try:
        settings = with_consumer(settings, metrics_port=port)
        async with Consumer(settings, vendors=[FakeVendor("amazon")], concurrency=1) as consumer:
            with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                await consumer.run()
    finally:
        holder.close()
        await drop_heartbeats(settings)


def test_breaker_state_from_the_marks() -> None:
    clock = FakeClock(1000.0)
    now = clock()
    state = lambda until, reason: breaker_state(until, reason, now, throttle_prefix=THROTTLE_PREFIX)  # noqa: E731
    assert state(0.0, "") == BREAKER_STATES["available"]
    assert state(now + 60, "HTTP 503") == BREAKER_STATES["unavailable"]
    assert state(now + 2, THROTTLE_PREFIX + "429") == BREAKER_STATES["throttled"]
    assert state(now - 1, "HTTP 503") == BREAKER_STATES["probing"]  # cooldown over, mark kept
    assert state(now - 1, THROTTLE_PREFIX + "429") == BREAKER_STATES["available"]  # no probe needed


def test_health_names_what_is_wrong() -> None:
    fresh = {"MongoDB": 100.0, "beanstalkd": 100.0}
    assert health_problem(loops_running=True, answered=fresh, now=101.0, within_s=15) is None
    late = health_problem(loops_running=True, answered={**fresh, "MongoDB": 80.0}, now=101.0, within_s=15)
    assert late == "MongoDB has not answered for 15 s"
    assert "loops" in str(health_problem(loops_running=False, answered=fresh, now=101.0, within_s=15))


def test_queue_depth_of_an_unused_tube_is_zero() -> None:
    metrics = ConsumerMetrics()
    metrics.queue_depth({"current-jobs-ready": 4})
    metrics.queue_depth({})
    assert 'mailer_queue_jobs{state="ready"} 0.0' in metrics.scrape().decode()


def test_a_producer_and_a_consumer_without_metrics_never_import_prometheus() -> None:
    code = (
        "import sys, mailer, mailer.producer, mailer.consumer, mailer.delivery, mailer.cli\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
