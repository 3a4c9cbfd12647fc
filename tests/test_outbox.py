"""The development outbox: a simulated send keeps the exact MIME message the SMTP vendor would
have sent, in MongoDB (round trips asserting MongoDB's documented results), capped at the
newest ``[simulation] keep_raw_max``, and ``mailer outbox ID`` prints it."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import consumer_env, mail, running_consumer, wait_all_status

from mailer import cli
from mailer.config import Settings
from mailer.models import Email, parse_email
from mailer.producer import Producer
from mailer.store import MailStore, OutboxEntry
from mailer.vendors.simulated import SimulatedVendor

HOSTILE = '<p>Hi <img src="x" onerror="alert(1)"></p>'


def with_simulation(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"simulation": settings.simulation.model_copy(update=changes)})


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[MailStore]:
    async with MailStore(settings) as s:
        yield s
        await s.outbox.drop()


def rich() -> Email:
    return parse_email(
        mail(
            1,
            html=HOSTILE,
            subject="Grüße ✓",
            attachments=[
                {"filename": "a.bin", "content_type": "application/pdf", "content": bytes(range(256))}
            ],
        )
    )


async def test_simulated_send_returns_the_smtp_vendors_mime_message() -> None:
    vendor = SimulatedVendor("amazon")
    result = await vendor.send(rich(), "6650c0ffee0123456789abcd")
    assert result.raw is not None and result.message_id.startswith("sim-amazon-")
    parsed = email.message_from_bytes(result.raw, policy=email.policy.default)
    assert parsed["X-Mailer-Id"] == "6650c0ffee0123456789abcd"
    assert parsed["Subject"] == "Grüße ✓"
    assert b"\r\n" in result.raw and result.raw.isascii()  # 7-bit wire form, as SMTP sends it
    html = parsed.get_body(("html",))
    assert html is not None and HOSTILE in html.get_content()
    (att,) = list(parsed.iter_attachments())
    assert att.get_filename() == "a.bin" and att.get_content() == bytes(range(256))


async def test_simulated_send_without_keep_raw_builds_nothing() -> None:
    result = await SimulatedVendor("amazon", keep_raw=False).send(rich(), "6650c0ffee0123456789abcd")
    assert result.raw is None


async def test_outbox_round_trip_keeps_bytes_exactly(store: MailStore) -> None:
    raw = b"Subject: x\r\n\r\n\x00\xff\x80 body\r\n"
    await store.keep_raw([OutboxEntry("6650c0ffee0123456789abcd", "amazon", "sim-1", raw)])
    found = await store.outbox_raw("6650c0ffee0123456789abcd")
    assert found is not None
    assert found.raw == raw and isinstance(found.raw, bytes)
    assert (found.vendor, found.message_id) == ("amazon", "sim-1")
    assert await store.outbox_raw("6650c0ffee0123456789abce") is None
    assert await store.outbox_raw("not an id") is None


async def test_outbox_newest_send_of_a_mail_wins(store: MailStore) -> None:
    mid = "6650c0ffee0123456789abcd"
    await store.keep_raw([OutboxEntry(mid, "amazon", "sim-1", b"first")])
    await store.keep_raw([OutboxEntry(mid, "mailgun", "sim-2", b"second")])
    found = await store.outbox_raw(mid)
    assert found is not None and (found.raw, found.vendor) == (b"second", "mailgun")


async def test_outbox_keeps_only_the_newest(settings: Settings) -> None:
    capped = with_simulation(settings, keep_raw_max=5)
    async with MailStore(capped) as store:
        try:
            for batch in range(4):
                entries = [
                    OutboxEntry(f"{batch:012x}{i:012x}", "amazon", f"sim-{batch}-{i}", b"x") for i in range(3)
                ]
                await store.keep_raw(entries)
            assert await store.outbox.count_documents({}) == 5
            kept = sorted([d["message_id"] async for d in store.outbox.find({}, {"message_id": 1})])
            assert kept == sorted(["sim-2-1", "sim-2-2", "sim-3-0", "sim-3-1", "sim-3-2"])
        finally:
            await store.outbox.drop()


async def test_consumer_keeps_the_raw_message_of_a_simulated_send(
    store: MailStore, settings: Settings
) -> None:
    async with Producer(settings) as producer:
        mail_id = await producer.send(mail(0, html="<b>hello</b>"))
    async with running_consumer(settings, [SimulatedVendor("amazon")], concurrency=1):
        await wait_all_status(store, [mail_id], "sent", within=20)
    found = await store.outbox_raw(mail_id)
    assert found is not None
    assert f"X-Mailer-Id: {mail_id}".encode() in found.raw
    record = await store.get(mail_id)
    assert found.message_id == record.message_id


async def test_keep_raw_false_stores_nothing(settings: Settings) -> None:
    off = with_simulation(settings, keep_raw=False)
    async with MailStore(off) as store:
        try:
            async with Producer(off) as producer:
                mail_id = await producer.send(mail(0))
            # Even a vendor that returns the bytes is not kept when the setting is off.
            async with running_consumer(off, [SimulatedVendor("amazon")], concurrency=1):
                await wait_all_status(store, [mail_id], "sent", within=20)
            assert await store.outbox_raw(mail_id) is None
        finally:
            await store.outbox.drop()


async def test_cli_outbox_prints_the_raw_message(
    store: MailStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    for key in list(os.environ):
        if key.startswith("MAILER_"):
            monkeypatch.delenv(key)
    for key, value in consumer_env(settings).items():
        if key.startswith("MAILER_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    raw = b"Subject: hi\r\nX-Mailer-Id: 6650c0ffee0123456789abcd\r\n\r\nbody \xe2\x9c\x93\r\n"
    await store.keep_raw([OutboxEntry("6650c0ffee0123456789abcd", "amazon", "sim-1", raw)])
    rc = await asyncio.to_thread(cli.main, ["outbox", "--test", "6650c0ffee0123456789abcd"])
    out, err = capfdbinary.readouterr()
    assert rc == 0, err
    assert out == raw
    rc = await asyncio.to_thread(cli.main, ["outbox", "--test", "6650c0ffee0123456789abce"])
    out, err = capfdbinary.readouterr()
    assert rc == 1 and out == b""
    assert err.count(b"\n") == 1 and b"outbox" in err


async def test_a_slow_outbox_never_holds_up_the_records(
    store: MailStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy is a development aid: the records' group commit returns without waiting for
    it, and closing the store cancels a copy MongoDB does not take in time."""
    from bson import ObjectId

    from mailer.models import Status
    from mailer.store import Finish

    stuck = asyncio.Event()

    async def never(entries: object) -> None:
        await stuck.wait()

    monkeypatch.setattr(store, "keep_raw", never)
    oid = ObjectId()
    await store.mails.insert_one({"_id": oid, "status": "sending", "mail": {}})
    finish = Finish(str(oid), Status.SENT, [], vendor="sim", message_id="sim-1", raw=b"Subject: x\r\n\r\nx")
    await asyncio.wait_for(store.finish_many([finish]), 5)
    assert (await store.mails.find_one({"_id": oid}) or {})["status"] == "sent"
    assert len([t for t in store._outbox_writes if not t.done()]) == 1
    stuck.set()
