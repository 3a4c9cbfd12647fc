"""The Producer SDK end to end: MongoDB first, then only the id on the tube."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from helpers import OwnBeanstalkd, wait_until
from pydantic import SecretStr
from pymongo.uri_parser import parse_uri
from vendors.http_doubles import LoopbackServer

from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.errors import (
    EmailValidationError,
    EnqueueError,
    MailNotFound,
    NotFound,
    ProducerClosedError,
    StoreError,
)
from mailer.models import Status
from mailer.producer import Producer, _Receipts
from mailer.requeue import sweep
from mailer.store import MailStore

MakeSettings = Callable[..., Awaitable[Settings]]
HEX24 = re.compile(r"^[0-9a-f]{24}$")


def mail(i: int = 0, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "from": "Shop <shop@example.com>",
        "to": f"customer{i}@example.com",
        "subject": f"Order {i} — ünïcode",
        "text": f"Thanks for order {i}",
    }
    data.update(changes)
    return data


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[Producer]:
    async with Producer(settings) as p:
        yield p


@pytest.fixture
async def reader(settings: Settings) -> AsyncIterator[Beanstalk]:
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as bs:
        await bs.use(b.tube)
        await bs.watch(b.tube)
        await bs.ignore("default")
        yield bs


async def tube_total(reader: Beanstalk, tube: str) -> int:
    """Every job ever put on the tube (0 when the tube does not exist)."""
    try:
        return int((await reader.stats_tube(tube))["total-jobs"])
    except NotFound:
        return 0


async def reserve_bodies(reader: Beanstalk, n: int) -> list[str]:
    bodies = []
    for _ in range(n):
        job = await reader.reserve(timeout=2)
        bodies.append(job.body.decode())
        await reader.delete(job.id)
    return bodies


async def jobs_of(reader: Beanstalk, n: int) -> dict[str, int]:
    """``{mail id: job id}`` of the next ``n`` jobs, each released again (still live)."""
    jobs = {}
    for _ in range(n):
        job = await reader.reserve(timeout=2)
        jobs[job.body.decode()] = job.id
    for job_id in jobs.values():
        await reader.release(job_id)
    return jobs


async def count_docs(settings: Settings) -> int:
    async with MailStore(settings) as store:
        return await store.mails.count_documents({})


# --- the send path -------------------------------------------------------------------


async def test_send_stores_queued_and_puts_the_id(
    producer: Producer, reader: Beanstalk, settings: Settings
) -> None:
    mail_id = await producer.send(mail(1))
    assert HEX24.match(mail_id)
    doc = await producer.store.mails.find_one({"_id": ObjectId(mail_id)})
    assert doc is not None and doc["status"] == "queued"
    assert doc["mail"]["to"][0]["email"] == "customer1@example.com"
    job = await reader.reserve(timeout=2)
    assert job.body == mail_id.encode()  # only the id travels on the tube
    stats = await reader.stats_job(job.id)
    assert stats["pri"] == settings.producer.default_priority
    assert stats["delay"] == 0 and stats["ttr"] == settings.beanstalkd.ttr_s
    assert stats["tube"] == settings.beanstalkd.tube
    assert await tube_total(reader, settings.beanstalkd.tube) == 1


async def test_status_returns_the_record(producer: Producer) -> None:
    mail_id = await producer.send(mail(2, cc=["cc@example.com"], metadata={"order": 2}))
    record = await producer.status(mail_id)
    assert record.id == mail_id
    assert record.status is Status.QUEUED
    assert record.email.subject == "Order 2 — ünïcode"
    assert record.email.metadata == {"order": 2}
    assert record.attempts == [] and record.vendor is None
    assert record.created_at.tzinfo is not None
    with pytest.raises(MailNotFound):
        await producer.status(str(ObjectId()))


async def test_send_accepts_model_json_and_from_underscore(producer: Producer, reader: Beanstalk) -> None:
    import json

    from mailer.models import parse_email

    ids = [
        await producer.send(parse_email(mail(1))),
        await producer.send(json.dumps(mail(2))),
        await producer.send({**{k: v for k, v in mail(3).items() if k != "from"}, "from_": "a@example.com"}),
    ]
    assert len(set(ids)) == 3
    assert sorted(await reserve_bodies(reader, 3)) == sorted(ids)


async def test_200_concurrent_sends(producer: Producer, reader: Beanstalk, settings: Settings) -> None:
    ids = await asyncio.gather(*(producer.send(mail(i)) for i in range(200)))
    assert len(set(ids)) == 200 and all(HEX24.match(i) for i in ids)
    assert await producer.store.mails.count_documents({}) == 200
    stored = {str(d["_id"]): d["mail"]["to"][0]["email"] async for d in producer.store.mails.find({})}
    # Each caller got the id of its own mail.
    for i, mail_id in enumerate(ids):
        assert stored[mail_id] == f"customer{i}@example.com"
    assert (await reader.stats_tube(settings.beanstalkd.tube))["current-jobs-ready"] == 200
    assert sorted(await reserve_bodies(reader, 200)) == sorted(ids)


async def test_send_many_1000(producer: Producer, reader: Beanstalk, settings: Settings) -> None:
    mails = [mail(i) for i in range(1000)]
    started = time.monotonic()
    ids = await producer.send_many(mails)
    assert time.monotonic() - started < 20
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert await producer.store.mails.count_documents({"status": {"$eq": "queued"}}) == 1000
    # In input order.
    first, last = await producer.status(ids[0]), await producer.status(ids[-1])
    assert first.email.to[0].email == "customer0@example.com"
    assert last.email.to[0].email == "customer999@example.com"
    assert (await reader.stats_tube(settings.beanstalkd.tube))["current-jobs-ready"] == 1000
    assert sorted(await reserve_bodies(reader, 1000)) == sorted(ids)
    assert await producer.send_many([]) == []


async def test_send_many_groups_priority_and_delay(producer: Producer, reader: Beanstalk) -> None:
    ids = await producer.send_many([mail(0, priority=3), mail(1, delay=120), mail(2)])
    delayed = await reader.peek_delayed()
    assert delayed is not None and delayed.body == ids[1].encode()
    s1 = await reader.stats_job(delayed.id)
    assert (s1["pri"], s1["delay"]) == (1024, 120)
    first, second = await reader.reserve(timeout=1), await reader.reserve(timeout=1)
    assert (first.body, second.body) == (ids[0].encode(), ids[2].encode())
    s0, s2 = await reader.stats_job(first.id), await reader.stats_job(second.id)
    assert (s0["pri"], s0["delay"]) == (3, 0)
    assert (s2["pri"], s2["delay"]) == (1024, 0)


async def only_job(reader: Beanstalk, mail_id: str) -> dict[str, str | int | float]:
    """Stats of the one job on the tube, which must carry ``mail_id``; then delete it."""
    job = await reader.peek_ready() or await reader.peek_delayed()
    assert job is not None and job.body == mail_id.encode()
    stats = await reader.stats_job(job.id)
    await reader.delete(job.id)
    assert await reader.peek_ready() is None and await reader.peek_delayed() is None
    return stats


async def test_priority_and_delay_map_to_the_job(producer: Producer, reader: Beanstalk) -> None:
    s_urgent = await only_job(reader, await producer.send(mail(1, priority=0)))
    assert (s_urgent["pri"], s_urgent["delay"], s_urgent["state"]) == (0, 0, "ready")
    later = await producer.send(mail(2, priority=4000, delay=90))
    s_later = await only_job(reader, later)
    assert (s_later["pri"], s_later["delay"], s_later["state"]) == (4000, 90, "delayed")
    send_at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=300)).isoformat()
    s_at = await only_job(reader, await producer.send(mail(3, send_at=send_at)))
    assert s_at["state"] == "delayed" and 295 <= int(s_at["delay"]) <= 301
    stored = await producer.store.mails.find_one({"_id": ObjectId(later)})
    assert stored is not None and stored["priority"] == 4000


# --- idempotency ---------------------------------------------------------------------


async def test_idempotent_resend(producer: Producer, reader: Beanstalk, settings: Settings) -> None:
    first = await producer.send(mail(1, idempotency_key="order-1"))
    again = await producer.send(mail(1, idempotency_key="order-1"))
    changed = await producer.send(mail(99, idempotency_key="order-1"))  # same key wins
    assert first == again == changed
    assert await producer.store.mails.count_documents({}) == 1
    assert await tube_total(reader, settings.beanstalkd.tube) == 1
    assert (await producer.status(first)).email.to[0].email == "customer1@example.com"
    # In a batch too: known keys return their ids, and a key repeated inside the batch once.
    batch = await producer.send_many(
        [
            mail(2, idempotency_key="order-1"),
            mail(3, idempotency_key="order-3"),
            mail(4, idempotency_key="order-3"),
        ]
    )
    assert batch[0] == first and batch[1] == batch[2] != first
    assert await producer.store.mails.count_documents({}) == 2
    assert await tube_total(reader, settings.beanstalkd.tube) == 2


async def test_concurrent_idempotent_sends_store_one(
    producer: Producer, reader: Beanstalk, settings: Settings
) -> None:
    ids = await asyncio.gather(*(producer.send(mail(i, idempotency_key="same")) for i in range(20)))
    assert len(set(ids)) == 1
    assert await producer.store.mails.count_documents({}) == 1
    assert await tube_total(reader, settings.beanstalkd.tube) == 1


# --- invalid input leaves nothing behind ---------------------------------------------

INVALID = [
    ("bad-address", mail(to="not an address"), "to"),
    ("no-body", {k: v for k, v in mail().items() if k != "text"}, "text"),
    ("crlf-subject", mail(subject="Hi\r\nBcc: victim@example.com"), "subject"),
    ("oversize", mail(text="x" * 5000), "text"),  # the biggest part is named
    ("wrong-type", mail(priority="urgent"), "priority"),
    ("unknown-field", mail(colour="red"), "colour"),
    ("header-injection", mail(headers={"X-A": "b\nBcc: v@example.com"}), "headers"),
    ("reserved-header", mail(headers={"Bcc": "v@example.com"}), "headers"),
]


@pytest.mark.parametrize(("data", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
async def test_invalid_mail_leaves_no_document_and_no_job(
    make_settings: MakeSettings, data: dict[str, Any], field: str
) -> None:
    settings = await make_settings()
    small = settings.model_copy(
        update={"producer": settings.producer.model_copy(update={"max_email_bytes": 2048})}
    )
    async with Producer(small) as producer:
        with pytest.raises(EmailValidationError) as info:
            await producer.send(data)
        assert any(f == field or f.startswith(field) for f, _ in info.value.errors), info.value.errors
        assert await producer.store.mails.count_documents({}) == 0
        assert await tube_total(producer.queue, settings.beanstalkd.tube) == 0


async def test_send_many_with_one_invalid_stores_nothing(
    producer: Producer, reader: Beanstalk, settings: Settings
) -> None:
    mails = [mail(i) for i in range(10)]
    mails[3] = mail(3, to="broken@")
    mails[7] = mail(7, subject="a\nb")
    with pytest.raises(EmailValidationError) as info:
        await producer.send_many(mails)
    fields = [f for f, _ in info.value.errors]
    assert any(f.startswith("[3].to") for f in fields), fields
    assert "[7].subject" in fields
    assert await producer.store.mails.count_documents({}) == 0
    assert await tube_total(reader, settings.beanstalkd.tube) == 0


# --- lifecycle -----------------------------------------------------------------------


async def test_use_before_connect_and_after_quit(settings: Settings) -> None:
    p = Producer(settings)
    for call in (lambda: p.send(mail()), lambda: p.send_many([mail()]), lambda: p.status(str(ObjectId()))):
        with pytest.raises(ProducerClosedError, match="connect"):
            await call()
    await p.connect()
    await p.connect()  # twice is fine
    assert HEX24.match(await p.send(mail()))
    await p.quit()
    await p.quit()  # twice is fine
    with pytest.raises(ProducerClosedError):
        await p.send(mail())
    assert await count_docs(settings) == 1


def test_test_flag_switches_tube_and_collection(base_settings: Settings) -> None:
    p = Producer(base_settings, test=True)
    assert p.settings.beanstalkd.tube == base_settings.test.tube
    assert p.settings.mongodb.collection == base_settings.test.collection


async def test_producer_on_unreachable_mongodb_fails_connect(settings: Settings) -> None:
    from pydantic import SecretStr

    from mailer.errors import StoreError

    mongo = settings.mongodb.model_copy(
        update={"uri": SecretStr("mongodb://127.0.0.1:1/x"), "timeout_ms": 300}
    )
    p = Producer(settings.model_copy(update={"mongodb": mongo}))
    with pytest.raises(StoreError):
        await p.connect()
    with pytest.raises(ProducerClosedError):
        await p.send(mail())


# --- beanstalkd down at send time ----------------------------------------------------


@pytest.fixture
def own_beanstalkd(tmp_path: Path) -> Iterator[OwnBeanstalkd]:
    server = OwnBeanstalkd(tmp_path)
    server.start()
    yield server
    server.kill()


def pointed_at(settings: Settings, port: int, **beanstalkd: Any) -> Settings:
    b = settings.beanstalkd.model_copy(update={"port": port, "connect_timeout_s": 1.0, **beanstalkd})
    return settings.model_copy(update={"beanstalkd": b})


async def test_beanstalkd_down_at_send_time(settings: Settings, own_beanstalkd: OwnBeanstalkd) -> None:
    async with Producer(pointed_at(settings, own_beanstalkd.port)) as producer:
        ok = await producer.send(mail(0))
        own_beanstalkd.kill()
        started = time.monotonic()
        with pytest.raises(EnqueueError) as info:
            await producer.send(mail(1))
        assert time.monotonic() - started < 5
        err = info.value
        assert len(err.mail_ids) == 1 and HEX24.match(err.mail_ids[0]) and err.mail_ids[0] != ok
        assert err.mail_ids[0] in str(err)
        assert "beanstalkd" in str(err) and "queued" in str(err)
        # The mail is not lost: stored, queued, for the requeue sweep.
        record = await producer.status(err.mail_ids[0])
        assert record.status is Status.QUEUED
        assert record.email.to[0].email == "customer1@example.com"
        # A batch: every id named, every document queued.
        with pytest.raises(EnqueueError) as batch_info:
            await producer.send_many([mail(2), mail(3), mail(4)])
        assert len(batch_info.value.mail_ids) == 3
        for mail_id in batch_info.value.mail_ids:
            assert (await producer.status(mail_id)).status is Status.QUEUED
        assert await producer.store.mails.count_documents({"status": {"$eq": "queued"}}) == 5


async def test_send_reconnects_after_a_beanstalkd_restart(
    settings: Settings, own_beanstalkd: OwnBeanstalkd
) -> None:
    s = pointed_at(settings, own_beanstalkd.port)
    async with Producer(s) as producer:
        before = await producer.send(mail(0))
        own_beanstalkd.kill()
        own_beanstalkd.start()  # same port and binlog
        after = await producer.send(mail(1))  # reconnects once, restores `use`
        batch = await producer.send_many([mail(2), mail(3)])
    async with Beanstalk("127.0.0.1", own_beanstalkd.port) as bs:
        await bs.watch(s.beanstalkd.tube)
        await bs.ignore("default")
        assert sorted(await reserve_bodies(bs, 4)) == sorted([before, after, *batch])


async def test_send_never_hangs_on_a_silent_server(settings: Settings) -> None:
    """A server that answers `use` but never a put: the send fails within the timeouts."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if line.startswith(b"use "):
                    writer.write(b"USING " + line[4:])
                    await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Producer(pointed_at(settings, port, command_timeout_s=0.3)) as producer:
            started = time.monotonic()
            with pytest.raises(EnqueueError) as info:
                await producer.send(mail(1))
            assert time.monotonic() - started < 3
            assert "did not answer" in str(info.value)
            assert (await producer.status(info.value.mail_ids[0])).status is Status.QUEUED
    finally:
        server.close()


class StallingProxy(LoopbackServer):
    """A TCP proxy in front of MongoDB that can stop passing the server's replies on: a
    server that takes writes and never answers them (frozen, or a network that drops one
    way), with the client's connections left open."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream
        self.passing = asyncio.Event()
        self.passing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        for pump in (self._pump(reader, up_writer, False), self._pump(up_reader, writer, True)):
            self._tasks.add(asyncio.create_task(pump))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
        try:
            while data := await src.read(65536):
                if replies:
                    await self.passing.wait()
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()


async def test_a_write_that_mongodb_never_answers_fails_within_its_deadline(settings: Settings) -> None:
    """The producer's inserts have one deadline each (``mongodb.timeout_ms``), not a timer
    per socket read: a lone send and a batch both fail with StoreError when it passes, and
    the connections they gave up on are not reused (the next sends get their own replies)."""
    (mongo,) = parse_uri(settings.mongodb.uri.get_secret_value())["nodelist"]
    proxy = StallingProxy(mongo)
    await proxy.start()
    proxied = f"mongodb://127.0.0.1:{proxy.port}/{settings.mongodb.database or 'mailer'}"
    m = settings.mongodb.model_copy(update={"uri": SecretStr(proxied), "timeout_ms": 600})
    s = settings.suppression.model_copy(update={"lease_s": 10.0})
    try:
        async with Producer(settings.model_copy(update={"mongodb": m, "suppression": s})) as producer:
            assert HEX24.match(await producer.send(mail(0)))
            # The suppression list's copy stays trusted throughout (its first read done), so
            # the writes are what waits.
            await wait_until(lambda: producer._suppressions.trusted, within=5, what="the list's copy")
            proxy.passing.clear()
            # A batch that fails as a whole is written again one mail at a time: two deadlines.
            for attempt, deadlines in (
                (lambda: producer.send(mail(1)), 1),
                (lambda: producer.send_many([mail(2), mail(3)]), 2),
            ):
                started = time.monotonic()
                with pytest.raises(StoreError, match="may or may not be stored"):
                    await attempt()
                assert 0.6 * deadlines <= time.monotonic() - started < 0.6 * deadlines + 0.9
            proxy.passing.set()
            first, second = await producer.send(mail(4)), await producer.send_many([mail(5), mail(6)])
            assert (await producer.status(first)).email.subject == mail(4)["subject"]
            assert [(await producer.status(i)).email.subject for i in second] == [
                mail(5)["subject"],
                mail(6)["subject"],
            ]
    finally:
        await proxy.stop()


# --- throughput lines ----------------------------------------------------------------


async def test_throughput_lines(make_settings: MakeSettings, capsys: pytest.CaptureFixture[str]) -> None:
    settings = await make_settings(measure_throughput=True, throughput_interval_s=0.2)
    pattern = re.compile(r"^Producer PID:\d+ Throughput: ([\d.]+) ops / second$")
    lines: list[str] = []
    async with Producer(settings) as producer:
        await producer.send_many([mail(i) for i in range(20)])
        deadline = time.monotonic() + 3
        # Until the interval that counted the 20 mails has been printed.
        while time.monotonic() < deadline and not any(
            float(m[1]) > 0 for m in map(pattern.match, lines) if m
        ):
            await asyncio.sleep(0.1)
            lines += [ln for ln in capsys.readouterr().out.splitlines() if "Throughput" in ln]
    assert lines, "no throughput line within 3 s"
    assert all(pattern.match(ln) for ln in lines), lines
    assert all(f"PID:{os.getpid()} " in ln for ln in lines)
    rates = [float(m[1]) for m in map(pattern.match, lines) if m]
    assert any(r > 0 for r in rates), lines  # the 20 mails were counted
    # Stopped with the producer: no more lines.
    await asyncio.sleep(0.3)
    assert "Producer PID:" not in capsys.readouterr().out


async def test_no_throughput_lines_by_default(producer: Producer, capsys: pytest.CaptureFixture[str]) -> None:
    await producer.send(mail())
    await asyncio.sleep(0.1)
    assert "Throughput" not in capsys.readouterr().out


# --- group commit: one huge mail does not fail its neighbours (finding 7b) ----------------


def big_mail(i: int, size: int) -> dict[str, Any]:
    return mail(i, attachments=[{"filename": f"f{i}.bin", "content": bytes([i % 251]) * size}])


def with_max_bytes(settings: Settings, max_bytes: int) -> Settings:
    producer = settings.producer.model_copy(update={"max_email_bytes": max_bytes})
    return settings.model_copy(update={"producer": producer})


async def concurrent_sends(producer: Producer, mails: list[dict[str, Any]]) -> list[str | BaseException]:
    """Every send in flight at once, the first one alone (so the rest go in one group)."""
    first = asyncio.create_task(producer.send(mails[0]))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(producer.send(m)) for m in mails[1:]]
    return list(await asyncio.gather(first, *rest, return_exceptions=True))


async def test_one_oversized_mail_fails_alone_and_its_neighbours_are_stored_and_queued(
    settings: Settings, reader: Beanstalk
) -> None:
    # Over MongoDB's 16 MiB document limit once stored (the model's cap raised to allow it).
    mails = (
        [mail(i) for i in range(11)]
        + [big_mail(11, 20_000_000)]
        + [big_mail(i, 3_000_000) for i in range(12, 22)]
    )
    async with Producer(with_max_bytes(settings, 40_000_000)) as producer:
        started = time.monotonic()
        results = await concurrent_sends(producer, mails)
        assert time.monotonic() - started < 30
    huge = results[11]
    assert isinstance(huge, StoreError), huge
    assert "16" in str(huge) and "attachments" in str(huge)
    ok = [r for i, r in enumerate(results) if i != 11]
    assert all(isinstance(r, str) and HEX24.match(r) for r in ok), [str(r)[:120] for r in ok]
    assert await count_docs(settings) == 21
    assert sorted(await reserve_bodies(reader, 21)) == sorted(str(r) for r in ok)


async def test_a_group_commit_is_bounded_by_bytes(
    settings: Settings, reader: Beanstalk, monkeypatch: pytest.MonkeyPatch
) -> None:
    mails = [big_mail(i, 2_000_000) for i in range(12)]
    async with Producer(with_max_bytes(settings, 10_000_000)) as producer:
        sizes: list[int] = []
        insert_many = producer.store.insert_many

        async def spy(docs: Sequence[dict[str, Any]]) -> list[tuple[str, bool] | StoreError]:
            sizes.append(sum(len(d["mail"]["attachments"][0]["content"]) for d in docs))
            return await insert_many(docs)

        monkeypatch.setattr(producer.store, "insert_many", spy)
        results = await concurrent_sends(producer, mails)
        ids = await producer.send_many(mails)
    assert all(isinstance(r, str) for r in results)
    assert len(sizes) >= 4 and max(sizes) <= 8 * 1024 * 1024, sizes
    assert sorted(await reserve_bodies(reader, 24)) == sorted([*map(str, results), *ids])


# --- refused at the edge: a mail no enabled vendor can carry (issue 9, item 2) ----------------


def with_vendor_order(settings: Settings, *names: str) -> Settings:
    return settings.model_copy(update={"vendors": settings.vendors.model_copy(update={"order": list(names)})})


FOUR_TAGS_TWO_REPLY_TO = {"tags": ["a", "b", "c", "d"], "reply_to": ["r1@example.com", "r2@example.com"]}


async def test_a_mail_no_enabled_vendor_can_carry_is_refused_and_nothing_is_stored(
    settings: Settings, reader: Beanstalk
) -> None:
    settings = with_vendor_order(settings, "mailgun", "sendinblue")
    async with Producer(settings) as producer:
        with pytest.raises(EmailValidationError) as info:
            await producer.send(mail(1, **FOUR_TAGS_TWO_REPLY_TO))
        with pytest.raises(EmailValidationError) as many:
            await producer.send_many([mail(2), mail(3, **FOUR_TAGS_TWO_REPLY_TO)])
        assert await producer.store.mails.count_documents({}) == 0
    assert int((await reader.stats_tube(settings.beanstalkd.tube))["total-jobs"]) == 0
    fields = dict(info.value.errors)
    assert set(fields) == {"tags", "reply_to"}, info.value.errors
    assert "mailgun" in fields["tags"] and "4 tags; Mailgun takes at most 3" in fields["tags"]
    assert "sendinblue" in fields["reply_to"] and "Brevo takes only one" in fields["reply_to"]
    assert "no enabled vendor can carry" in str(info.value)
    assert {f for f, _ in many.value.errors} == {"[1].tags", "[1].reply_to"}


async def test_a_mail_one_enabled_vendor_can_carry_is_accepted(settings: Settings) -> None:
    settings = with_vendor_order(settings, "mailgun", "sendinblue")
    async with Producer(settings) as producer:
        four_tags = await producer.send(mail(1, tags=["a", "b", "c", "d"]))  # Brevo takes it
        assert (await producer.status(four_tags)).status == Status.QUEUED


async def test_nothing_is_refused_while_an_enabled_vendor_has_no_declared_limits(settings: Settings) -> None:
    """SMTP's one refusal (SMTPUTF8) depends on the relay, so the edge cannot tell."""
    settings = with_vendor_order(settings, "mailgun", "sendinblue", "smtp")
    async with Producer(settings) as producer:
        assert HEX24.match(await producer.send(mail(1, **FOUR_TAGS_TWO_REPLY_TO)))


def test_the_default_vendors_each_give_their_reason(base_settings: Settings) -> None:
    """All four default vendors refuse this one, each for its own documented limit."""
    producer = Producer(base_settings)
    everything = mail(1, to="ñandú@example.com", metadata={"tags": "x"}, **FOUR_TAGS_TWO_REPLY_TO)
    with pytest.raises(EmailValidationError) as info:
        producer.validate(everything)
    named = {msg.split(":")[0].rsplit(" ", 1)[-1] for _, msg in info.value.errors}
    assert {f for f, _ in info.value.errors} == {"to", "tags", "reply_to", "metadata"}
    assert named == {"amazon", "mailgun", "sendinblue", "sparkpost"}, info.value.errors
    assert producer.validate(mail(2, tags=["a", "b", "c", "d"])).tags == ["a", "b", "c", "d"]


# --- the lone caller's path (issue 16) -------------------------------------------------


async def test_a_lone_send_writes_only_its_insert_and_its_receipt_later(
    settings: Settings, reader: Beanstalk, monkeypatch: pytest.MonkeyPatch
) -> None:
    receipts: list[tuple[str, dict[str, int]]] = []
    async with Producer(settings) as producer:
        monkeypatch.setattr(producer._receipts, "_delay", 3600.0)  # only quit() writes it
        record_jobs = producer.store.record_jobs

        async def spy(leader: str, jobs: dict[str, int]) -> None:
            receipts.append((leader, dict(jobs)))
            await record_jobs(leader, jobs)

        monkeypatch.setattr(producer.store, "record_jobs", spy)
        ids = [await producer.send(mail(i)) for i in range(5)]
        assert receipts == []  # no second write on any caller's path
    jobs = await jobs_of(reader, len(ids))
    assert receipts == [(ids[0], jobs)]  # one receipt for the five, written by quit()
    async with MailStore(settings) as store:
        await check_lone_receipt(settings, store, ids, jobs)


async def check_lone_receipt(
    settings: Settings, store: MailStore, ids: list[str], jobs: dict[str, int]
) -> None:
    stored = await store.mails.find({}, {"batch": 1, "batch_jobs": 1}).to_list()
    assert {d["batch"] for d in stored} == {ids[0]}
    leader = next(d for d in stored if str(d["_id"]) == ids[0])
    assert leader["batch_jobs"] == jobs
    # The sweep sees every job, even judged long after the in-flight bound.
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as queue:
        report = await sweep(settings, store, queue, older_than_s=0, now=time.time() + 120)
    assert report.requeued == [] and report.live == 5, report.summary()


async def test_lone_receipts_are_written_in_the_background_one_per_epoch(
    settings: Settings, reader: Beanstalk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consecutive lone sends share an epoch's receipt; once an epoch is written, the next
    send begins a new one. (Epochs are by time: a slow machine may split the first three
    sends over two epochs, so the test follows the leaders their documents name.)"""
    async with Producer(settings) as producer:
        store = producer.store
        monkeypatch.setattr(producer._receipts, "_delay", 0.05)
        first = [await producer.send(mail(i)) for i in range(3)]
        stored = await store.mails.find(
            {"_id": {"$in": [ObjectId(i) for i in first]}}, {"batch": 1}
        ).to_list()
        leaders = sorted({str(d["batch"]) for d in stored})
        assert leaders[0] == first[0] and set(leaders) <= set(first)

        async def receipts_of(names: list[str]) -> dict[str, dict[str, int] | None] | None:
            got = await store.receipts(names)
            return got if all(got.get(n) for n in names) else None

        receipts = await wait_until(lambda: receipts_of(leaders), within=10, what="the first receipts")
        later = await producer.send(mail(3))  # every epoch was written: a new one begins
        assert (await store.mails.find_one({"_id": ObjectId(later)}, {"batch": 1}) or {})["batch"] == later
        second = await wait_until(lambda: receipts_of([later]), within=10, what="the second receipt")
    jobs = {}
    for _ in range(4):
        job = await reader.reserve(timeout=2)
        jobs[job.body.decode()] = job.id
    merged = {m: j for r in receipts.values() for m, j in (r or {}).items()}
    assert merged == {i: jobs[i] for i in first} and second == {later: {later: jobs[later]}}


async def test_an_epoch_receipt_waits_for_every_member_in_flight() -> None:
    written: list[dict[str, int]] = []

    class Store:
        async def record_jobs(self, leader: str, jobs: dict[str, int]) -> None:
            written.append(dict(jobs))

        async def record_job_ids(self, jobs: dict[str, int]) -> None:
            raise AssertionError("the leader was stored: its receipt must carry the batch")

    receipts = _Receipts(Store(), delay=0.0)
    a, b = {"_id": ObjectId()}, {"_id": ObjectId()}
    epoch = receipts.join(a)
    assert receipts.join(b) is epoch and b["batch"] == str(a["_id"])
    await asyncio.sleep(0.01)  # the epoch's time is up while both are in flight
    receipts.leave(epoch, str(a["_id"]), stored=True, job=7)
    await asyncio.sleep(0.01)
    assert written == []  # b may still get a job: a receipt without it would be wrong
    c = {"_id": ObjectId()}
    assert receipts.join(c) is not epoch  # a closing epoch takes no one new
    receipts.leave(epoch, str(b["_id"]), stored=True, job=None)  # b's put failed: no job
    await receipts.close(within=5)
    assert written[0] == {str(a["_id"]): 7}


async def test_a_batch_whose_leader_was_not_stored_records_each_job() -> None:
    """A group commit's leader can turn out to be a known idempotency key's mail (not
    stored): its document cannot carry the receipt, so each job is recorded on its own
    mail, and the members that joined the epoch later are in it too."""
    by_leader: list[dict[str, int]] = []
    per_mail: list[dict[str, int]] = []

    class Store:
        async def record_jobs(self, leader: str, jobs: dict[str, int]) -> None:
            by_leader.append(dict(jobs))

        async def record_job_ids(self, jobs: dict[str, int]) -> None:
            per_mail.append(dict(jobs))

    receipts = _Receipts(Store(), delay=3600.0)
    batch = [{"_id": ObjectId()} for _ in range(3)]
    epoch, lead = receipts.join_all(batch, lambda: 2)
    assert lead == 2  # this batch opened the epoch
    later = [{"_id": ObjectId()}]
    assert receipts.join_all(later, lambda: 0) == (epoch, None)  # joins: opens nothing
    assert later[0]["batch"] == str(batch[2]["_id"])
    queued = {str(d["_id"]): i for i, d in enumerate(batch[:2])}  # the leader's key was known
    receipts.leave_all(epoch, 3, queued, leader_stored=False)
    receipts.leave_all(epoch, 1, {str(later[0]["_id"]): 9}, leader_stored=None)
    await receipts.close(within=5)
    assert by_leader == [] and per_mail == [queued | {str(later[0]["_id"]): 9}]


async def test_written_receipts_are_not_kept() -> None:
    """A process that sends alone for days opens an epoch every 50 ms: each written receipt
    must be let go, or the waiting set grows without bound."""

    class Store:
        async def record_jobs(self, leader: str, jobs: dict[str, int]) -> None:
            pass

        async def record_job_ids(self, jobs: dict[str, int]) -> None:
            pass

    receipts = _Receipts(Store(), delay=0.0)
    for i in range(50):
        doc = {"_id": ObjectId()}
        epoch = receipts.join(doc)
        receipts.leave(epoch, str(doc["_id"]), stored=True, job=i)
        await asyncio.sleep(0)
        batch = [{"_id": ObjectId()} for _ in range(3)]  # a group commit's epoch, too
        epoch, lead = receipts.join_all(batch, lambda: 1)
        receipts.leave_all(
            epoch, 3, {str(d["_id"]): i for d in batch}, leader_stored=lead is not None or None
        )
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    assert receipts._unwritten == set()


async def test_group_commits_share_one_epoch_receipt(
    settings: Settings, reader: Beanstalk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several group commits in a row write one receipt between them, not one each (that
    was an eighth of a concurrent send's CPU), and the sweep still sees every job."""
    receipts: list[tuple[str, dict[str, int]]] = []
    writes: list[int] = []
    async with Producer(settings) as producer:
        monkeypatch.setattr(producer._receipts, "_delay", 3600.0)  # only quit() writes it
        record_jobs, insert_many = producer.store.record_jobs, producer.store.insert_many

        async def spy(leader: str, jobs: dict[str, int]) -> None:
            receipts.append((leader, dict(jobs)))
            await record_jobs(leader, jobs)

        async def counted(docs: Any) -> Any:
            writes.append(len(docs))
            return await insert_many(docs)

        monkeypatch.setattr(producer.store, "record_jobs", spy)
        monkeypatch.setattr(producer.store, "insert_many", counted)
        ids: list[str] = []
        for round_ in range(3):
            ids += await asyncio.gather(*(producer.send(mail(100 * round_ + i)) for i in range(40)))
        assert len(writes) >= 3 and receipts == []
    jobs = await jobs_of(reader, len(ids))
    assert len(receipts) == 1 and receipts[0][1] == jobs  # one receipt for every batch
    async with MailStore(settings) as store:
        stored = await store.mails.find({}, {"batch": 1}).to_list()
        assert {str(d["batch"]) for d in stored} == {receipts[0][0]}
        b = settings.beanstalkd
        async with Beanstalk(b.host, b.port) as queue:
            report = await sweep(settings, store, queue, older_than_s=0, now=time.time() + 120)
        assert report.requeued == [] and report.live == len(ids), report.summary()


async def test_a_full_epoch_is_written_without_waiting_for_its_time(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    async with Producer(settings) as producer:
        monkeypatch.setattr(producer._receipts, "_delay", 3600.0)
        monkeypatch.setattr(producer._receipts, "_max", 30)
        record_jobs = producer.store.record_jobs

        async def spy(leader: str, jobs: dict[str, int]) -> None:
            written.append(len(jobs))
            await record_jobs(leader, jobs)

        monkeypatch.setattr(producer.store, "record_jobs", spy)
        await producer.send_many([mail(i) for i in range(30)])
        await wait_until(lambda: written == [30], within=5, what="the full epoch's receipt")


async def test_concurrent_sends_still_group_commit(
    producer: Producer, reader: Beanstalk, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: collections.Counter[str] = collections.Counter()
    for name in ("insert", "insert_many"):
        original = getattr(producer.store, name)

        def counted(*args: Any, _name: str = name, _f: Any = original) -> Any:
            calls[_name] += 1
            return _f(*args)

        monkeypatch.setattr(producer.store, name, counted)
    ids = await asyncio.gather(*(producer.send(mail(i)) for i in range(200)))
    assert len(set(ids)) == 200
    assert calls["insert"] == 1 and calls["insert_many"] <= 10, calls
    assert sorted(await reserve_bodies(reader, 200)) == sorted(ids)
