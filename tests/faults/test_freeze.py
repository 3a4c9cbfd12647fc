"""Frozen servers: MongoDB, then beanstalkd, SIGSTOPped for 10 s mid-run and SIGCONTinued.

A frozen server is not a dead one: its sockets stay open, connects succeed, and nothing
answers; the clients' own timeouts are all that notice. Requests the clients gave up on are
still in the server's buffers, and it carries them out when it wakes (a claim, a record, a
put, a delete the client believes failed)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from helpers import with_beanstalkd

from mailer.store import MailStore

from .harness import (
    Beanstalkd,
    ConsumerProcess,
    Feeder,
    Mongo,
    Processes,
    ScenarioSettings,
    all_accepted,
    assert_clean,
    frozen,
    record,
    settled_within,
    tally,
    total_sends,
    wait_until,
)

N = 600
FREEZE_S = 10.0


async def freeze_for(server: Mongo | Beanstalkd, seconds: float) -> float:
    """SIGSTOP ``server`` for ``seconds``; the monotonic time it was thawed."""
    with frozen(server):
        await asyncio.sleep(seconds)
    return time.monotonic()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_mongodb_frozen_10s(make_scenario: ScenarioSettings, procs: Processes, tmp_path: Path) -> None:
    """nx-27017 frozen for 10 s, five times its 2 s timeout, while two producers (one mail
    per call, retried with the same idempotency key on StoreError) and a consumer run. TTR
    (and the lease) is 20 s, so a sent mail's record, retried for 80% of it, outlasts the
    freeze, and a claim MongoDB applied after its client gave up is waited out, not sent
    twice. Mails stored while their producer saw an error were not queued (the retry got the
    id back): the consumer's own sweep (every 2 s) queues them once their writer is surely
    done, which is why the beanstalkd client timeouts are short here."""
    mongo = Mongo(tmp_path / "mongo")
    procs.add(mongo)
    await mongo.start()
    settings = with_beanstalkd(
        make_scenario(
            "mongo_freeze",
            mongo_uri=mongo.uri,
            ttr_s=20,
            timeout_ms=2000,
            simulation={"latency_ms": 100},
            consumer={"requeue_interval_s": 2.0, "requeue_older_than_s": 2.0},
        ),
        connect_timeout_s=2.0,
        command_timeout_s=3.0,
    )
    began = time.monotonic()
    async with MailStore(settings) as store:
        consumer = ConsumerProcess(settings, tmp_path, concurrency=20)
        procs.add(consumer)
        await consumer.start()
        feeders = [Feeder(settings, "mfa"), Feeder(settings, "mfb")]
        feeding = [
            asyncio.create_task(f.run(N // 2, batch=5, pause=0.05, single=True, retry_pause=0.5))
            for f in feeders
        ]

        async def some_sent() -> bool:
            return await store.mails.count_documents({"status": {"$eq": "sent"}}) >= N // 6

        await wait_until(some_sent, within=30, what="some mails sent before the freeze")
        errors_before = sum(len(f.errors) for f in feeders)
        thawed = await freeze_for(mongo, FREEZE_S)
        errors_during = sum(len(f.errors) for f in feeders) - errors_before
        await asyncio.wait_for(asyncio.gather(*feeding), 90)
        accepted = all_accepted(*feeders)
        settled = await settled_within(store, len(accepted), within=60, what="after the freeze")
        t = await tally(store, accepted, total_sends([consumer]))
        errors = [e for f in feeders for e in f.errors]
        log = consumer.output()
        held = len(set(re.findall(r"recording mail ([0-9a-f]{24}) failed", log)))
        requeued = sum(int(n) for n in re.findall(r"requeue: requeued (\d+)", log))
        record(
            "MongoDB frozen 10 s (SIGSTOP)",
            t,
            recover_s=None if settled is None else settled - thawed,
            total_s=time.monotonic() - began,
            notes=(
                f"timeout 2 s, TTR 20 s; producer: {len(errors)} typed errors "
                f"({', '.join(sorted({type(e).__name__ for e in errors})) or 'none'}), "
                f"{errors_during} during the freeze, retried with the same keys; "
                f"{held} sent mail(s) held their record; "
                f"the consumer's sweep requeued {requeued}"
                + ("" if settled is not None else f"; NOT settled 60 s after: {t.statuses}")
            ),
        )
        assert consumer.alive, consumer.tail()
        assert await consumer.terminate() == 0, consumer.tail()
    assert errors_during > 0, "the producers should have seen the freeze"
    assert not [e for f in feeders for e in f.unexpected_errors()], errors
    assert len(accepted) == N
    assert t.stored_not_accepted == 0, "an idempotent retry returns the id of a stored mail"
    assert_clean(t)
    assert t.sent_once == N


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_beanstalkd_frozen_10s(
    make_scenario: ScenarioSettings, beanstalkd: Beanstalkd, procs: Processes, tmp_path: Path
) -> None:
    """beanstalkd frozen for 10 s while a producer (batches) and two consumers run. The
    clients' command timeout is 3 s, so they give up and reconnect while it sleeps; it then
    carries out what was already sent (puts the producer counted as failed, deletes and
    reserves of closed connections). TTR is 5 s: reserved jobs' TTRs run out across the
    freeze, so their jobs come back while their mails are still leased. The consumers' own
    sweep (every 2 s) queues the mails whose put failed."""
    settings = with_beanstalkd(
        make_scenario(
            "bs_freeze",
            ttr_s=5,
            simulation={"latency_ms": 20},
            consumer={"requeue_interval_s": 2.0, "requeue_older_than_s": 2.0},
        ),
        command_timeout_s=3.0,
    )
    began = time.monotonic()
    async with MailStore(settings) as store:
        consumers = [ConsumerProcess(settings, tmp_path, concurrency=10) for _ in range(2)]
        for c in consumers:
            procs.add(c)
        await asyncio.gather(*(c.start() for c in consumers))
        feeder = Feeder(settings, "bfz")
        feeding = asyncio.create_task(feeder.run(N, batch=10, pause=0.05))
        await wait_until(lambda: len(feeder.accepted) >= N // 4, within=30, what="a quarter accepted")
        sent_before = await store.mails.count_documents({"status": {"$eq": "sent"}})
        thawed = await freeze_for(beanstalkd, FREEZE_S)
        await asyncio.wait_for(feeding, 90)
        settled = await settled_within(store, N, within=60, what="after the thaw")
        t = await tally(store, feeder.accepted, total_sends(consumers))
        logs = [c.output() for c in consumers]
        timeouts = sum(log.count("in time; the connection was closed") for log in logs)
        requeued = sum(int(n) for log in logs for n in re.findall(r"requeue: requeued (\d+)", log))
        record(
            "beanstalkd frozen 10 s (SIGSTOP)",
            t,
            recover_s=None if settled is None else settled - thawed,
            total_s=time.monotonic() - began,
            notes=(
                f"command timeout 3 s, TTR 5 s; frozen with {sent_before} of {N} sent; producer errors "
                f"{dict(feeder.error_types)} ({len(set(feeder.stored_unqueued))} stored, not queued); "
                f"consumers' sweeps requeued {requeued}; {timeouts} command timeout(s) logged"
                + ("" if settled is not None else f"; NOT settled 60 s after: {t.statuses}")
            ),
        )
        for c in consumers:
            assert c.alive, c.tail()
            assert await c.terminate() == 0, c.tail()
    assert not feeder.unexpected_errors(), feeder.unexpected_errors()
    assert len(feeder.accepted) == N
    assert 0 < sent_before < N, "the freeze should land mid-run"
    assert_clean(t)
    assert t.sent_once == N
