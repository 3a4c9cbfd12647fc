"""The MongoDB server stopped for 10 s mid-run, then restarted on the same data directory."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from mailer.errors import StoreError
from mailer.store import MailStore

from .harness import (
    ConsumerProcess,
    Feeder,
    Mongo,
    Processes,
    ScenarioSettings,
    assert_clean,
    record,
    run_cli,
    tally,
    total_sends,
    tube_counts,
    unsettled,
    wait_until,
)

N = 600
OUTAGE_S = 10.0


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_mongodb_stopped_for_10s_and_restarted(
    make_scenario: ScenarioSettings, procs: Processes, tmp_path: Path
) -> None:
    """Producers (the SDK, one mail per call) keep sending through the outage: each call
    either succeeds or raises the typed StoreError, and the application retries with the same
    idempotency key. Consumers pause and continue without a restart. TTR (and the claim lease)
    is 30 s, longer than the outage, so a delivery whose record cannot be written yet keeps
    retrying the write rather than having its mail taken over and sent again."""
    mongo = Mongo(tmp_path / "mongo")
    procs.add(mongo)
    await mongo.start()
    settings = make_scenario(
        "mongo_stop",
        mongo_uri=mongo.uri,
        ttr_s=30,
        timeout_ms=2000,
        simulation={"latency_ms": 200},
    )
    began = time.monotonic()
    store = MailStore(settings)
    await store.connect()
    try:
        consumer = procs.add(ConsumerProcess(settings, tmp_path, concurrency=20))
        assert isinstance(consumer, ConsumerProcess)
        await consumer.start()
        feeders = [Feeder(settings, "mga"), Feeder(settings, "mgb")]
        feeding = [
            asyncio.create_task(f.run(N // 2, batch=5, pause=0.05, single=True, retry_pause=0.5))
            for f in feeders
        ]

        async def some_sent() -> bool:
            return await store.mails.count_documents({"status": {"$eq": "sent"}}) >= N // 6

        await wait_until(some_sent, within=30, what="some mails sent before the outage")
        await asyncio.to_thread(mongo.stop)  # SIGTERM: it may serve a little longer while stopping
        stopped = time.monotonic()
        accepted_before = sum(len(f.accepted) for f in feeders)
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
        during = sum(len(f.accepted) for f in feeders) - accepted_before
        errors_during = sum(len(f.errors) for f in feeders)
        await mongo.start()
        restarted = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*feeding), 90)
        accepted = list(dict.fromkeys(i for f in feeders for i in f.accepted))

        # Documents stored while their producer saw an error (an insert applied whose answer
        # was lost) were not queued: wait until the queue is drained, then sweep once.
        async def drained() -> bool:
            counts = await tube_counts(settings)
            return counts["ready"] + counts["reserved"] + counts["delayed"] == 0

        await wait_until(drained, within=60, what="the tube to drain after the outage")
        # The sweep leaves a mail alone while its writer may still be recording its job
        # (requeue.in_flight_s), so sweep until it has queued them all.
        requeued = 0

        async def swept_and_settled() -> bool:
            nonlocal requeued
            rc, out, err = await run_cli(settings, tmp_path, "requeue", "--older-than", "0")
            assert rc == 0, err
            m = re.search(r"requeued (\d+) of (\d+)", out)
            assert m, out
            requeued += int(m.group(1))
            return await unsettled(store) == 0 and await store.mails.count_documents({}) >= len(accepted)

        await wait_until(
            swept_and_settled, within=90, interval=3.0, what="every mail settled after the outage"
        )
        settled = time.monotonic()
        assert consumer.alive, consumer.tail()
        t = await tally(store, accepted, total_sends([consumer]))
        errors = [e for f in feeders for e in f.errors]
        types = sorted({type(e).__name__ for e in errors})
        log = consumer.output()
        held = len(set(re.findall(r"recording mail ([0-9a-f]{24}) failed", log)))
        record(
            "MongoDB stopped 10 s, restarted",
            t,
            recover_s=settled - restarted,
            total_s=time.monotonic() - began,
            notes=(
                f"producer: {len(errors)} typed errors ({', '.join(types) or 'none'}), retried with the same "
                f"idempotency keys, {during} accepted during the outage; {t.stored_not_accepted} stored but "
                f"never acknowledged; consumer paused and continued, {held} sent mail(s) held their record "
                f"until MongoDB was back; {requeued} stored while their producer saw an error "
                f"(its retry got the id back) were queued by requeue sweeps after"
            ),
        )
        assert await consumer.terminate() == 0, consumer.tail()
    finally:
        await store.close()
    assert errors_during > 0, "the producers should have seen the outage"
    assert all(isinstance(e, StoreError) for e in errors), [
        repr(e) for e in errors if not isinstance(e, StoreError)
    ]
    assert all("MongoDB" in str(e) for e in errors), [str(e) for e in errors]
    assert len(accepted) == N
    assert t.stored_not_accepted == 0, "an idempotent retry returns the id of a stored mail"
    assert held > 0, "deliveries in flight at the stop should have waited to record their result"
    assert_clean(t)
    assert t.sent_once == N
