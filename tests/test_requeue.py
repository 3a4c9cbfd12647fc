"""The requeue sweep is exact: a mail whose job is still in beanstalkd (ready, delayed,
reserved or buried) is never queued again, whatever the threshold or the priorities; a mail
whose job is gone is queued again once, in batches, even by two sweeps at once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from conftest import drain_tube
from helpers import OwnBeanstalkd, docs, mail, tube_counts

from mailer import claims as claiming
from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.errors import EnqueueError
from mailer.models import Status
from mailer.producer import Producer
from mailer.requeue import sweep
from mailer.store import MailStore

MakeSettings = Callable[..., Awaitable[Settings]]


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[MailStore]:
    async with MailStore(settings) as s:
        yield s


@pytest.fixture
async def queue(settings: Settings) -> AsyncIterator[Beanstalk]:
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as bs:
        await bs.use(b.tube)
        await bs.watch(b.tube)
        await bs.ignore("default")
        yield bs


async def send_many(settings: Settings, mails: list[dict[str, Any]]) -> list[str]:
    async with Producer(settings) as producer:
        return await producer.send_many(mails)


async def queued_bodies(settings: Settings) -> collections.Counter[str]:
    """Every ready job's body (reserved and deleted on the way): what consumers would get."""
    b = settings.beanstalkd
    bodies: collections.Counter[str] = collections.Counter()
    async with Beanstalk(b.host, b.port) as bs:
        await bs.watch(b.tube)
        await bs.ignore("default")
        while True:
            try:
                job = await bs.reserve(timeout=0)
            except Exception:
                return bodies
            bodies[job.body.decode()] += 1
            await bs.delete(job.id)


# --- (a), (b): a healthy backlog is left alone ---------------------------------------


@pytest.mark.parametrize("older_than", [0.0, 20.0])
async def test_a_ready_backlog_is_never_requeued(
    settings: Settings, store: MailStore, queue: Beanstalk, older_than: float
) -> None:
    ids = await send_many(settings, [mail(i) for i in range(3000)])
    # Later than every stamp: with a threshold, a backlog waiting this long looked orphaned.
    report = await sweep(settings, store, queue, older_than_s=older_than, now=time.time() + 60)
    assert report.requeued == []
    assert report.live == 3000
    assert (await tube_counts(settings))["ready"] == 3000
    assert len(await docs(store, ids, {"_id": 1})) == 3000


async def test_mixed_priorities_and_delayed_reserved_buried_jobs_are_live(
    settings: Settings, store: MailStore, queue: Beanstalk
) -> None:
    ids = await send_many(settings, [mail(i, priority=[0, 5000, 2**31][i % 3]) for i in range(3000)])
    # Turn the backlog into every state a job can be in: delayed (a consumer's back-off),
    # reserved (held right now) and buried, keeping a few ready of each priority.
    held: list[int] = []
    for n in range(2400):
        job = await queue.reserve(timeout=2)
        if n < 2000:
            await queue.release(job.id, priority=1024, delay=3600)
        elif n < 2200:
            await queue.bury(job.id)
        else:
            held.append(job.id)
    counts = await tube_counts(settings)
    assert counts == {"ready": 600, "reserved": 200, "delayed": 2000, "buried": 200}
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as other:
        for older_than in (0.0, 20.0):
            report = await sweep(settings, store, other, older_than_s=older_than, now=time.time() + 60)
            assert report.requeued == [] and report.live == 3000, report.summary()
    assert await tube_counts(settings) == counts
    assert len(ids) == 3000


# --- (c): jobs that are gone are requeued once, in batches ----------------------------


class _Counting:
    """Counts the calls made through an object's methods (a collection, a connection)."""

    def __init__(self, real: Any, calls: collections.Counter[str], prefix: str) -> None:
        self._real, self._calls, self._prefix = real, calls, prefix

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._calls[f"{self._prefix}.{name}"] += 1
            return attr(*args, **kwargs)

        return counted


@contextlib.contextmanager
def counting_round_trips(store: MailStore, queue: Beanstalk) -> Iterator[collections.Counter[str]]:
    """Speed is for the bench; what a test can pin is the shape: round trips per chunk, not
    per mail (one at a time, 6,000 orphans took minutes)."""
    calls: collections.Counter[str] = collections.Counter()
    real_mails = store._mails
    store._mails = _Counting(real_mails, calls, "mongo")  # type: ignore[assignment]
    for name in ("put", "put_many", "peek"):
        real = getattr(queue, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[f"beanstalkd.{_name}"] += 1
            return _real(*args, **kwargs)

        setattr(queue, name, counted)
    try:
        yield calls
    finally:
        store._mails = real_mails
        for name in ("put", "put_many", "peek"):
            delattr(queue, name)


def assert_batched(calls: collections.Counter[str], n: int) -> None:
    chunks = n // 1000 + 1
    assert calls["beanstalkd.put"] == 0, calls  # puts are pipelined, per chunk
    assert calls["beanstalkd.put_many"] <= 2 * chunks, calls
    assert calls["mongo.update_one"] + calls["mongo.find_one_and_update"] == 0, calls
    assert sum(v for k, v in calls.items() if k.startswith("mongo.")) <= 8 * chunks, calls


@pytest.mark.slow
async def test_lost_jobs_are_all_requeued_once_and_fast(
    settings: Settings, store: MailStore, queue: Beanstalk
) -> None:
    ids = await send_many(settings, [mail(i) for i in range(6000)])
    await drain_tube(settings)  # beanstalkd lost them (a deleted binlog)
    with counting_round_trips(store, queue) as calls:
        report = await sweep(settings, store, queue, older_than_s=0)
    assert sorted(report.requeued) == sorted(ids)
    assert_batched(calls, 6000)
    bodies = await queued_bodies(settings)
    assert bodies == collections.Counter(ids)
    # The sweep after that finds them all live.
    again = await sweep(settings, store, queue, older_than_s=0)
    assert again.requeued == [] and again.live == 0  # the tube was emptied by queued_bodies


@pytest.mark.slow
async def test_mails_whose_put_failed_are_requeued_at_once(
    settings: Settings, store: MailStore, queue: Beanstalk, tmp_path: Path
) -> None:
    down = OwnBeanstalkd(tmp_path)
    down.start()
    b = settings.beanstalkd.model_copy(update={"port": down.port, "connect_timeout_s": 1.0})
    try:
        async with Producer(settings.model_copy(update={"beanstalkd": b})) as producer:
            down.kill()
            with pytest.raises(EnqueueError) as info:
                await producer.send_many([mail(i) for i in range(5000)])
    finally:
        down.kill()
    ids = info.value.all_ids
    assert len(ids) == 5000
    with counting_round_trips(store, queue) as calls:
        report = await sweep(settings, store, queue, older_than_s=0)
    assert sorted(report.requeued) == sorted(ids)
    assert_batched(calls, 5000)
    assert await queued_bodies(settings) == collections.Counter(ids)


# --- (d): two sweeps at once ---------------------------------------------------------


async def test_two_concurrent_sweeps_queue_each_orphan_once(
    settings: Settings, store: MailStore, queue: Beanstalk
) -> None:
    ids = await send_many(settings, [mail(i) for i in range(2000)])
    await drain_tube(settings)
    b = settings.beanstalkd
    async with MailStore(settings) as store2, Beanstalk(b.host, b.port) as queue2:
        first, second = await asyncio.gather(
            sweep(settings, store, queue, older_than_s=0), sweep(settings, store2, queue2, older_than_s=0)
        )
    assert sorted(first.requeued + second.requeued) == sorted(ids)
    assert await queued_bodies(settings) == collections.Counter(ids)


# --- (e): claims whose consumer died --------------------------------------------------


async def test_expired_leases_are_requeued_only_when_their_job_is_gone(
    settings: Settings, store: MailStore, queue: Beanstalk
) -> None:
    ids = await send_many(settings, [mail(i) for i in range(4)])
    jobs = {}
    for _ in ids:
        job = await queue.reserve(timeout=2)
        jobs[job.body.decode()] = job.id
    for mail_id in ids:  # claimed by a consumer that died: the lease ran out
        claim = await claiming.claim(
            store, ObjectId(mail_id), job_id=jobs[mail_id], consumer="dead", lease_s=-1
        )
        assert claim.doc is not None and claim.doc["status"] == Status.SENDING.value
    lost = ids[:2]
    for mail_id in lost:  # ... and so did their jobs
        await queue.delete(jobs[mail_id])
    for mail_id in ids[2:]:  # these went back to ready (the dead consumer's connection closed)
        await queue.release(jobs[mail_id])
    report = await sweep(settings, store, queue, older_than_s=0)
    assert sorted(report.requeued) == sorted(lost)
    assert report.live == 2
    assert await queued_bodies(settings) == collections.Counter(ids)


async def test_dry_run_reports_without_queueing(
    settings: Settings, store: MailStore, queue: Beanstalk
) -> None:
    ids = await send_many(settings, [mail(i) for i in range(5)])
    await drain_tube(settings)
    report = await sweep(settings, store, queue, older_than_s=0, dry_run=True)
    assert sorted(report.requeued) == sorted(ids)
    assert "would requeue 5 of 5" in report.summary()
    assert await tube_counts(settings) == {"ready": 0, "reserved": 0, "delayed": 0, "buried": 0}
    real = await sweep(settings, store, queue, older_than_s=0)
    assert sorted(real.requeued) == sorted(ids)
