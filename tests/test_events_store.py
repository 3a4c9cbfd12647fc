"""Delivery events and the suppression list against the local MongoDB (nx-27017): each store
operation round-trips with MongoDB's documented result, events are idempotent and attach to
their mail, and the producer refuses or drops suppressed recipients (one query per write)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
from bson import ObjectId
from helpers import mail, tube_counts
from test_cli import cli_env  # noqa: F401  (the fixture, by its name)
from test_cli import mailer as run_cli

from mailer.config import Settings, SnsWebhookSettings, SuppressionSettings
from mailer.errors import EmailValidationError, RecipientSuppressed
from mailer.events import (
    Event,
    EventType,
    SuppressionCheck,
    event_doc,
    event_key,
    ingest,
    normalize_address,
)
from mailer.models import Status
from mailer.producer import Producer
from mailer.store import Finish, MailStore

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


async def drop_event_collections(store: MailStore) -> None:
    for collection in (store.events, store.unknown_events, store.suppressions, store.webhook_seen):
        await collection.drop()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[MailStore]:
    async with MailStore(settings) as s:
        yield s
        await drop_event_collections(s)


def event(i: int = 0, **changes: Any) -> Event:
    data: dict[str, Any] = {
        "key": event_key("mailgun", f"ev-{i}"),
        "vendor": "mailgun",
        "type": EventType.DELIVERED,
        "raw_name": "delivered",
        "message_id": f"<m{i}@mg.example.com>",
        "recipient": f"rcpt{i}@example.com",
        "at": T0 + dt.timedelta(seconds=i),
        "raw": {"event": "delivered", "n": i},
    }
    data.update(changes)
    return Event(**data)


async def sent_mail(store: MailStore, i: int = 0, message_id: str | None = None) -> str:
    """A mail stored and finished as sent, the way delivery records it."""
    doc = MailStore.new_document(Producer(store.settings).validate(mail(i)), priority=1)
    mail_id, _ = await store.insert(doc)
    await store.finish_many([Finish(mail_id, Status.SENT, [], vendor="mailgun", message_id=message_id)])
    return mail_id


# --- rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "key"),
    [
        ("Bob@Example.COM", "Bob@example.com"),
        (" <ann@EXAMPLE.org> ", "ann@example.org"),
        ("a@b@Example.com", "a@b@example.com"),
    ],
)
def test_address_key_keeps_the_local_part_and_lowercases_the_domain(given: str, key: str) -> None:
    assert normalize_address(given) == key


def test_event_key_is_deterministic_and_distinct() -> None:
    assert event_key("mailgun", "x", 0) == event_key("mailgun", "x", 0)
    assert len({event_key("mailgun", "x", 0), event_key("mailgun", "x", 1), event_key("amazon", "x", 0)}) == 3


# --- store round trips --------------------------------------------------------------------


async def test_record_events_is_idempotent_per_key(store: MailStore) -> None:
    first = [event_doc(event(1), "m"), event_doc(event(2), "m")]
    assert await store.record_events(first) == [True, True]
    again = [event_doc(event(1), "m"), event_doc(event(3), "m"), event_doc(event(2), "m")]
    assert await store.record_events(again) == [False, True, False]
    assert await store.events.count_documents({}) == 3
    stored = await store.events.find_one({"_id": event(1).key})
    assert stored is not None and stored["raw"] == {"event": "delivered", "n": 1}
    assert stored["at"] == T0 + dt.timedelta(seconds=1) and stored["type"] == "delivered"


async def test_unknown_events_are_kept_apart_and_counted(store: MailStore) -> None:
    assert await store.record_events([event_doc(event(1), None)], unknown=True) == [True]
    assert await store.record_events([event_doc(event(1), None)], unknown=True) == [False]
    assert await store.count_unknown_events() == 1
    assert await store.events.count_documents({}) == 0


async def test_mails_are_found_by_the_message_id_recorded_at_send(store: MailStore) -> None:
    a = await sent_mail(store, 1, "<a@mg.example.com>")
    b = await sent_mail(store, 2, "0100-ses-id")
    await sent_mail(store, 3, None)
    found = await store.mails_by_message_id(["<a@mg.example.com>", "0100-ses-id", "<nobody@x>"])
    assert found == {"<a@mg.example.com>": a, "0100-ses-id": b}
    assert await store.mails_by_message_id([]) == {}
    indexes = await store.mails.index_information()
    assert any(spec["key"] == [("message_id", 1)] for spec in indexes.values())  # sparse: nx-27017 omits it


async def test_known_mails_by_our_id(store: MailStore) -> None:
    a = await sent_mail(store, 1)
    assert await store.known_mails([a, str(ObjectId()), "not-an-id"]) == {a}


async def test_events_of_a_mail_oldest_first_without_the_raw_payload(store: MailStore) -> None:
    await store.record_events(
        [event_doc(event(3), "m1"), event_doc(event(1), "m1"), event_doc(event(2), "m2")]
    )
    got = await store.events_of("m1")
    assert [d["_id"] for d in got] == [event(1).key, event(3).key]
    assert all("raw" not in d for d in got)


async def test_update_delivery_is_a_compare_and_set(store: MailStore) -> None:
    mail_id = await sent_mail(store, 1)

    def bump(current: dict[str, Any] | None) -> dict[str, Any]:
        n = (current or {}).get("n", 0)
        return {"n": n + 1, "at": T0}

    results = await asyncio.gather(*(store.update_delivery(mail_id, bump, tries=20) for _ in range(5)))
    assert all(results)
    summary = await store.delivery_of(mail_id)
    assert summary == {"delivery": {"n": 5, "at": T0}, "suppressed": []}
    assert await store.update_delivery(str(ObjectId()), bump) is False


async def test_suppressions_round_trip(store: MailStore) -> None:
    assert await store.add_suppression("b@example.com", reason="complained", source={"vendor": "x"})
    assert not await store.add_suppression("b@example.com", reason="manual")  # the first entry stands
    assert await store.add_suppression("a@example.com", reason="manual")
    entry = await store.get_suppression("b@example.com")
    assert entry is not None and entry["reason"] == "complained" and entry["source"] == {"vendor": "x"}
    assert isinstance(entry["at"], dt.datetime)
    assert await store.suppressed_among(["a@example.com", "c@example.com"]) == {"a@example.com"}
    assert await store.suppressed_among([]) == set()
    assert [d["_id"] for d in await store.list_suppressions()] == ["a@example.com", "b@example.com"]
    assert [d["_id"] for d in await store.list_suppressions(after="a@example.com", limit=5)] == [
        "b@example.com"
    ]
    assert (
        await store.add_suppressions(["c@example.com", "b@example.com", "c@example.com"], reason="import")
        == 1
    )
    assert await store.add_suppressions([], reason="import") == 0
    assert await store.suppressed_among(["c@example.com"]) == {"c@example.com"}
    assert await store.remove_suppression("c@example.com")
    assert await store.remove_suppression("a@example.com")
    assert not await store.remove_suppression("a@example.com")
    assert await store.suppressed_among(["a@example.com", "b@example.com"]) == {"b@example.com"}


async def test_webhook_tokens_are_remembered_once(store: MailStore) -> None:
    assert not await store.seen_before("mailgun:t1")
    assert await store.mark_seen("mailgun:t1")
    assert not await store.mark_seen("mailgun:t1")
    assert await store.seen_before("mailgun:t1")
    indexes = await store.webhook_seen.index_information()
    assert any(spec.get("expireAfterSeconds") for spec in indexes.values())


# --- ingest: attach, summarise, suppress --------------------------------------------------


async def test_ingest_attaches_summarises_and_suppresses(store: MailStore) -> None:
    mail_id = await sent_mail(store, 1, "<m1@mg.example.com>")
    by_header = await sent_mail(store, 2, None)
    bounce = event(1, type=EventType.BOUNCED, bounce="hard", raw_name="failed", recipient="Rcpt1@EXAMPLE.com")
    batch = [
        event(10, message_id="<m1@mg.example.com>", at=T0),
        bounce,
        event(20, message_id=None, mailer_id=by_header),
        event(30, message_id="<stranger@x>"),
    ]
    result = await ingest(store, batch, add_on=["bounced_hard", "complained"])
    assert (result.received, result.new, result.unknown) == (4, 4, 1)
    assert result.suppressed == ["Rcpt1@example.com"]
    delivery = (await store.delivery_of(mail_id))["delivery"]
    assert delivery["delivered_at"] == T0 and delivery["bounced"] is True and delivery["bounce"] == "hard"
    assert delivery["complained"] is False and delivery["events"] == 2 and delivery["last"] == "bounced"
    assert [e["type"] for e in await store.events_of(mail_id)] == ["delivered", "bounced"]
    assert len(await store.events_of(by_header)) == 1
    assert await store.count_unknown_events() == 1
    entry = await store.get_suppression("Rcpt1@example.com")
    assert entry is not None and entry["source"]["mail_id"] == mail_id

    again = await ingest(store, batch, add_on=["bounced_hard"])  # a redelivery adds nothing
    assert (again.new, again.suppressed) == (0, [])
    assert (await store.delivery_of(mail_id))["delivery"]["events"] == 2
    assert await store.events.count_documents({}) == 3


async def test_soft_bounce_does_not_suppress_by_default(store: MailStore) -> None:
    soft = event(1, type=EventType.BOUNCED, bounce="soft")
    assert (await ingest(store, [soft], add_on=SuppressionSettings().add_on)).suppressed == []
    assert (await ingest(store, [event(2, type=EventType.COMPLAINED)], add_on=["complained"])).suppressed == [
        "rcpt2@example.com"
    ]


# --- the check at send time ---------------------------------------------------------------


class CountingList:
    """A suppression list that counts its queries."""

    def __init__(self, listed: set[str]) -> None:
        self.listed = listed
        self.queries = 0

    async def suppressed_among(self, addresses: Any) -> set[str]:
        self.queries += 1
        return self.listed & set(addresses)


async def test_screen_is_one_query_per_batch_and_drops(settings: Settings) -> None:
    producer = Producer(settings)
    docs = [
        MailStore.new_document(producer.validate(mail(i, cc=["keep@example.com"])), priority=1)
        for i in range(3)
    ]
    docs.append(MailStore.new_document(producer.validate(mail(9)), priority=1))
    listed = CountingList({"rcpt1@example.com", "rcpt9@example.com"})
    assert await SuppressionCheck(listed, "drop").screen(docs) == [None] * 4
    assert listed.queries == 1
    assert docs[1]["suppressed"] == ["rcpt1@example.com"] and docs[1]["status"] == "queued"
    assert (
        docs[1]["mail"]["to"] == [{"email": "keep@example.com"}] and docs[1]["mail"]["cc"] == []
    )  # cc moves up
    assert docs[3]["mail"]["to"] == [{"email": "rcpt9@example.com"}]  # kept as given
    assert docs[3]["status"] == "suppressed" and "suppressed" not in docs[0]

    refusing = CountingList({"rcpt1@example.com"})
    fresh = [MailStore.new_document(producer.validate(mail(i)), priority=1) for i in range(3)]
    found = await SuppressionCheck(refusing, "refuse").screen(fresh)
    assert [f is None for f in found] == [True, False, True] and refusing.queries == 1
    assert isinstance(found[1], RecipientSuppressed) and found[1].addresses == ["rcpt1@example.com"]


def with_mode(settings: Settings, mode: Literal["refuse", "drop"]) -> Settings:
    return settings.model_copy(update={"suppression": SuppressionSettings(mode=mode)})


async def test_send_to_a_suppressed_address_is_refused_and_nothing_stored(
    settings: Settings, store: MailStore
) -> None:
    await store.add_suppression("rcpt1@example.com", reason="bounced_hard")
    async with Producer(settings) as producer:
        with pytest.raises(RecipientSuppressed) as caught:
            await producer.send(mail(1))  # the lone path
        assert caught.value.addresses == ["rcpt1@example.com"] and isinstance(
            caught.value, EmailValidationError
        )
        assert "mailer suppress remove" in str(caught.value)
        with pytest.raises(RecipientSuppressed) as batch:
            await producer.send_many([mail(0), mail(1), mail(2)])
        assert batch.value.by_field == {"[1].to": ["rcpt1@example.com"]}
        assert await store.mails.count_documents({}) == 0
        # Concurrent sends are group-committed: only the suppressed one is refused.
        results = await asyncio.gather(*(producer.send(mail(i)) for i in range(6)), return_exceptions=True)
    assert [isinstance(r, RecipientSuppressed) for r in results] == [False, True, False, False, False, False]
    assert await store.mails.count_documents({}) == 5
    assert (await tube_counts(settings))["ready"] == 5


async def test_drop_mode_removes_recipients_and_never_queues_an_empty_mail(
    settings: Settings, store: MailStore
) -> None:
    await store.add_suppression("rcpt1@example.com", reason="complained")
    async with Producer(with_mode(settings, "drop")) as producer:
        alone = await producer.send(mail(1))
        partly = await producer.send(mail(2, cc=["Rcpt1@example.com", "rcpt1@EXAMPLE.com"]))
        many = await producer.send_many([mail(1), mail(3)])
        grouped = await asyncio.gather(*(producer.send(mail(i)) for i in range(4)))
    assert (await store.get(alone)).status is Status.SUPPRESSED
    assert (await store.get(many[0])).status is Status.SUPPRESSED
    assert (await store.get(grouped[1])).status is Status.SUPPRESSED
    record = await store.get(partly)
    assert record.status is Status.QUEUED and [a.email for a in record.email.cc] == ["Rcpt1@example.com"]
    assert (await store.delivery_of(partly))["suppressed"] == ["rcpt1@example.com"]
    assert (await store.delivery_of(alone))["suppressed"] == ["rcpt1@example.com"]
    # Queued: partly, many[1] and the three grouped mails to others.
    assert (await tube_counts(settings))["ready"] == 5


# --- mailer suppress, mailer status ---------------------------------------------------------


@pytest.mark.usefixtures("cli_env")
async def test_cli_suppress_add_list_remove(store: MailStore, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = await run_cli(capsys, "suppress", "add", "--test", "Bob@EXAMPLE.com", "--reason", "asked")
    assert rc == 0 and out == "Bob@example.com: suppressed\n"
    rc, out, _ = await run_cli(capsys, "suppress", "add", "--test", "bob@example.com", "Bob@example.com")
    assert rc == 0 and out == "bob@example.com: suppressed\nBob@example.com: already suppressed\n"
    rc, out, _ = await run_cli(capsys, "suppress", "list", "--test", "--json")
    assert rc == 0 and [(r["address"], r["reason"]) for r in json.loads(out)] == [
        ("Bob@example.com", "asked"),
        ("bob@example.com", "manual"),
    ]
    rc, out, _ = await run_cli(
        capsys, "suppress", "remove", "--test", "bob@example.com", "nobody@example.com"
    )
    assert rc == 1 and out == "bob@example.com: removed\nnobody@example.com: was not on the list\n"
    rc, _, err = await run_cli(capsys, "suppress", "add", "--test", "not an address")
    assert rc == 2 and "user@example.com" in err
    rc, _, err = await run_cli(capsys, "suppress", "add", "--test")
    assert rc == 2 and "ADDRESS" in err
    rc, _, err = await run_cli(capsys, "suppress", "list", "--test", "x@example.com")
    assert rc == 2
    assert await store.suppressed_among(["Bob@example.com", "bob@example.com"]) == {"Bob@example.com"}


@pytest.mark.usefixtures("cli_env")
async def test_cli_status_shows_events_and_the_send_is_refused(
    store: MailStore, capsys: pytest.CaptureFixture[str]
) -> None:
    mail_id = await sent_mail(store, 1, "<m1@mg.example.com>")
    bounce = event(1, type=EventType.BOUNCED, bounce="hard", raw_name="failed", reason="550 no such user")
    await ingest(store, [event(0, message_id="<m1@mg.example.com>"), bounce], add_on=["bounced_hard"])
    rc, out, _ = await run_cli(capsys, "status", "--test", mail_id)
    assert rc == 0
    assert "delivery:  delivered 2026-01-02T03:04:05+00:00; bounced (hard)" in out
    assert "events:    2" in out and "bounced (hard)   rcpt1@example.com  550 no such user" in out
    rc, out, _ = await run_cli(capsys, "status", "--test", "--json", mail_id)
    data = json.loads(out)
    assert [e["type"] for e in data["events"]] == ["delivered", "bounced"] and data["delivery"]["bounced"]
    send = (
        "send",
        "--test",
        "--from",
        "a@example.com",
        "--to",
        "rcpt1@example.com",
        "--subject",
        "s",
        "--text",
        "t",
    )
    rc, _, err = await run_cli(capsys, *send)
    assert rc == 1 and "rcpt1@example.com" in err and "mailer suppress remove" in err


def test_config_refuses_a_cert_origin_that_is_not_a_pattern() -> None:
    with pytest.raises(ValueError, match=r"entry \[1\] is not a regular expression"):
        SnsWebhookSettings(cert_origins=["https://ok", "https://sns.(unclosed"])
    assert SnsWebhookSettings().cert_origins[0].startswith("https://sns")
