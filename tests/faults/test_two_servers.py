"""Two beanstalkd servers (``beanstalkd.servers``): one SIGKILLed mid-run and restarted on its
binlog, and one gone for good (binlog deleted, never restarted). Counted on the vendor side."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from mailer.config import Settings
from mailer.fleet import server_of
from mailer.store import MailStore

from .harness import (
    Beanstalkd,
    ConsumerProcess,
    Feeder,
    Mongo,
    Processes,
    ScenarioSettings,
    assert_clean,
    record,
    tally,
    total_sends,
    wait_settled,
    wait_until,
)

N = 1000


@pytest.fixture
def second(procs: Processes, tmp_path: Path) -> Beanstalkd:
    """The second private beanstalkd (the first is the scenario's own), with its binlog."""
    server = Beanstalkd(tmp_path / "beanstalkd2")
    procs.add(server)
    server.start_sync()
    return server


def on_both(settings: Settings, first: Beanstalkd, second: Beanstalkd) -> Settings:
    servers = (f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}")
    b = settings.beanstalkd.model_copy(update={"servers": servers, "connect_timeout_s": 1.0})
    return settings.model_copy(update={"beanstalkd": b})


def consumer_on_both(settings: Settings, tmp_path: Path, procs: Processes) -> ConsumerProcess:
    consumer = ConsumerProcess(settings, tmp_path, concurrency=20)
    assert consumer.env is not None
    consumer.env["MAILER_BEANSTALKD__SERVERS"] = json.dumps(list(settings.beanstalkd.servers))
    procs.add(consumer)
    return consumer


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_one_of_two_servers_sigkilled_and_restarted_on_its_binlog(
    make_scenario: ScenarioSettings,
    beanstalkd: Beanstalkd,
    second: Beanstalkd,
    session_mongo: Mongo,
    procs: Processes,
    tmp_path: Path,
) -> None:
    """The second server dies for 2 s mid-run: puts of its mails go to the first meanwhile,
    its loops reconnect when it is back, its binlog brings its jobs back; the consumer's sweep
    may queue some of its mails on the first meanwhile, and their claims let one job deliver."""
    settings = on_both(
        make_scenario(
            "two_kill",
            ttr_s=10,
            simulation={"latency_ms": 20},
            consumer={"requeue_interval_s": 2.0, "requeue_older_than_s": 2.0},
        ),
        beanstalkd,
        second,
    )
    began = time.monotonic()
    async with MailStore(settings) as store:
        consumer = consumer_on_both(settings, tmp_path, procs)
        await consumer.start()
        feeder = Feeder(settings, "tk")
        feeding = asyncio.create_task(feeder.run(N, batch=10, pause=0.03))
        await wait_until(lambda: len(feeder.accepted) >= N // 3, within=30, what="a third of the mails")
        sent_before = await store.mails.count_documents({"status": {"$eq": "sent"}})
        second.kill()
        await asyncio.sleep(2.0)
        await second.start()
        restarted = time.monotonic()
        await asyncio.wait_for(feeding, 60)
        settled = await wait_settled(store, N, within=90, what="after the restart")
        assert consumer.alive, consumer.tail()
        t = await tally(store, feeder.accepted, total_sends([consumer]))
        spread = sum(server_of(m, 2) for m in feeder.accepted)
        record(
            "2 beanstalkd servers, one SIGKILLed 2 s, restart on binlog",
            t,
            recover_s=settled - restarted,
            total_s=time.monotonic() - began,
            notes=f"{spread} of {N} mails' own server was the killed one; {sent_before} sent before the kill",
        )
        assert await consumer.terminate() == 0, consumer.tail()
    assert not feeder.unexpected_errors(), feeder.unexpected_errors()
    assert 0.4 * N <= spread <= 0.6 * N
    assert 0 < sent_before < N, "the kill should land mid-run"
    assert "beanstalkd unavailable" in consumer.output()
    assert_clean(t)
    assert t.sent_once == N


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_one_of_two_servers_gone_for_good_its_mails_go_to_the_survivor(
    make_scenario: ScenarioSettings,
    beanstalkd: Beanstalkd,
    second: Beanstalkd,
    session_mongo: Mongo,
    procs: Processes,
    tmp_path: Path,
) -> None:
    """Every mail is queued, half on each server; the second is killed, its binlog deleted,
    and it never comes back. The consumer's own sweep finds its mails without a live job and
    puts them on the first; each is sent once."""
    settings = on_both(
        make_scenario(
            "two_gone",
            ttr_s=10,
            simulation={"latency_ms": 50},
            consumer={"requeue_interval_s": 2.0, "requeue_older_than_s": 1.0},
        ),
        beanstalkd,
        second,
    )
    began = time.monotonic()
    async with MailStore(settings) as store:
        feeder = Feeder(settings, "tg")
        await feeder.run(N, batch=50)
        assert len(feeder.accepted) == N and not feeder.errors
        on_second = sum(server_of(m, 2) for m in feeder.accepted)
        consumer = consumer_on_both(settings, tmp_path, procs)
        await consumer.start()

        async def some_sent() -> bool:
            return await store.mails.count_documents({"status": {"$eq": "sent"}}) >= N // 10

        await wait_until(some_sent, within=30, what="a tenth of the mails sent")
        second.kill()
        removed = second.wipe_binlog()
        lost_at = time.monotonic()
        settled = await wait_settled(store, N, within=100, what="with the second server gone")
        assert consumer.alive, consumer.tail()
        t = await tally(store, feeder.accepted, total_sends([consumer]))
        record(
            "2 beanstalkd servers, one gone for good (binlog deleted)",
            t,
            recover_s=settled - lost_at,
            total_s=time.monotonic() - began,
            notes=f"{on_second} of {N} mails were on the lost server; the consumer's sweep moved them",
        )
        assert await consumer.terminate() == 0, consumer.tail()
    assert removed > 0
    assert 0.4 * N <= on_second <= 0.6 * N
    assert "requeue: requeued" in consumer.output()
    assert_clean(t)
    assert t.sent_once == N
