"""beanstalkd SIGKILLed mid-run: restarted on its binlog, and restarted with the binlog lost."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from mailer.store import MailStore

from .harness import (
    Beanstalkd,
    ConsumerProcess,
    Feeder,
    Processes,
    ScenarioSettings,
    assert_clean,
    record,
    run_cli,
    tally,
    total_sends,
    wait_settled,
    wait_until,
)

N = 1000


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_beanstalkd_sigkill_restart_on_binlog(
    make_scenario: ScenarioSettings, beanstalkd: Beanstalkd, procs: Processes, tmp_path: Path
) -> None:
    """Killed mid-run, down for 2 s, restarted on the same binlog and port. Jobs come back
    from the binlog (reserved ones as ready); consumers and producers reconnect by themselves;
    mails whose put failed meanwhile are stored and queued again by the consumer's own sweep."""
    settings = make_scenario(
        "bs_kill",
        ttr_s=10,
        simulation={"latency_ms": 20},
        consumer={"requeue_interval_s": 2.0, "requeue_older_than_s": 2.0},
    )
    began = time.monotonic()
    async with MailStore(settings) as store:
        consumer = procs.add(ConsumerProcess(settings, tmp_path, concurrency=20))
        assert isinstance(consumer, ConsumerProcess)
        await consumer.start()
        feeder = Feeder(settings, "bsk")
        feeding = asyncio.create_task(feeder.run(N, batch=10, pause=0.03))

        await wait_until(lambda: len(feeder.accepted) >= N // 3, within=30, what="a third of the mails")
        sent_before = await store.mails.count_documents({"status": {"$eq": "sent"}})
        beanstalkd.kill()
        await asyncio.sleep(2.0)
        await beanstalkd.start()
        restarted = time.monotonic()
        await asyncio.wait_for(feeding, 60)
        settled = await wait_settled(store, N, within=60, what="after the restart")
        assert consumer.alive, consumer.tail()
        sends = total_sends([consumer])
        t = await tally(store, feeder.accepted, sends)
        log = consumer.output()
        reconnects = log.count("beanstalkd unavailable")
        record(
            "beanstalkd SIGKILL, restart on binlog",
            t,
            recover_s=settled - restarted,
            total_s=time.monotonic() - began,
            notes=(
                f"down 2 s with {sent_before} of {N} sent; producer errors {dict(feeder.error_types)} "
                f"({len(set(feeder.stored_unqueued))} stored, queued later by the consumer's sweep); "
                f"consumer reconnected by itself"
            ),
        )
        assert await consumer.terminate() == 0, consumer.tail()
    assert not feeder.unexpected_errors(), feeder.unexpected_errors()
    assert len(feeder.accepted) == N
    assert 0 < sent_before < N, "the kill should land mid-run"
    assert reconnects > 0, "the consumer should have seen beanstalkd go away"
    assert_clean(t)
    assert t.sent_once == N


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_beanstalkd_restart_with_binlog_deleted(
    make_scenario: ScenarioSettings, beanstalkd: Beanstalkd, procs: Processes, tmp_path: Path
) -> None:
    """The queue is lost (binlog deleted: a lost disk). MongoDB still holds every mail, and
    `mailer requeue --older-than 0` queues everything unsent again. The consumer's own sweep
    is off, so the CLI alone is what recovers them."""
    settings = make_scenario("bs_wipe", ttr_s=10, simulation={"latency_ms": 50})
    began = time.monotonic()
    async with MailStore(settings) as store:
        feeder = Feeder(settings, "bsw")
        await feeder.run(N, batch=50)
        assert len(feeder.accepted) == N and not feeder.errors
        consumer = procs.add(ConsumerProcess(settings, tmp_path, concurrency=10))
        assert isinstance(consumer, ConsumerProcess)
        await consumer.start()

        async def some_sent() -> bool:
            return await store.mails.count_documents({"status": {"$eq": "sent"}}) >= N // 5

        await wait_until(some_sent, within=30, what="a fifth of the mails sent")
        beanstalkd.kill()
        removed = beanstalkd.wipe_binlog()
        await beanstalkd.start()
        restarted = time.monotonic()
        # Let in-flight deliveries finish and the consumer reconnect; nothing else would come.
        await asyncio.sleep(3.0)
        stuck = await store.mails.count_documents({"status": {"$in": ["queued", "sending", "retrying"]}})
        rc, out, err = await run_cli(settings, tmp_path, "requeue", "--older-than", "0")
        assert rc == 0, err
        m = re.search(r"requeued (\d+) of (\d+)", out)
        assert m, out
        requeued = int(m.group(1))
        settled = await wait_settled(store, N, within=60, what="after `mailer requeue`")
        assert consumer.alive, consumer.tail()
        t = await tally(store, feeder.accepted, total_sends([consumer]))
        record(
            "beanstalkd restart, binlog deleted",
            t,
            recover_s=settled - restarted,
            total_s=time.monotonic() - began,
            notes=(
                f"{removed} binlog file(s) deleted; {stuck} mails without a job after 3 s; "
                f"`mailer requeue --older-than 0` requeued {requeued}"
            ),
        )
        assert await consumer.terminate() == 0, consumer.tail()
    assert removed > 0
    assert stuck > 0 and requeued == stuck, (stuck, requeued, out)
    assert_clean(t)
    assert t.sent_once == N
