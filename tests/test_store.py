"""MongoDB store round trips on nx-27017 (and real MongoDB): what is stored reads back equal."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from bson import ObjectId
from pydantic import SecretStr
from pymongo.errors import NetworkTimeout

from mailer import claims as claiming
from mailer.claims import ClaimState
from mailer.config import Settings
from mailer.errors import MailNotFound, StoreError
from mailer.models import Attempt, Email, Status, parse_email
from mailer.store import Doc, Finish, MailStore, attempt_doc, parse_mail_id, to_record

MakeSettings = Callable[..., Awaitable[Settings]]
UTC = dt.UTC


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[MailStore]:
    async with MailStore(settings) as s:
        yield s


def rich_mail(**changes: Any) -> Email:
    data: dict[str, Any] = {
        "from": "Jörg Müller <joerg@bücher.de>",
        "to": ["Ann Ötzi <ann@example.com>", "δοκιμή@παράδειγμα.δοκιμή"],
        "cc": {"email": "cc@example.com", "name": "Çé"},
        "bcc": ["bcc@example.com"],
        "reply_to": "Support <support@example.com>",
        "subject": "Grüße 🎉 — 你好",
        "text": "plain ü",
        "html": "<p>html ü</p>",
        "headers": {"X-Campaign": "spring-ü", "List-Unsubscribe": "<mailto:u@example.com>"},
        "tags": ["welcome", "t-2"],
        "metadata": {"user_id": 42, "ratio": 0.25, "vip": True, "note": None, "name": "Zoë", "big": 2**40},
        "attachments": [
            {"filename": "räport.pdf", "content_type": "application/pdf", "content": bytes(range(256))},
            {"filename": "empty.txt", "content_type": "text/plain", "content": b""},
        ],
        "priority": 12,
        "send_at": dt.datetime(2031, 2, 3, 4, 5, 6, 789123, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "idempotency_key": None,
    }
    data.update(changes)
    return parse_email({k: v for k, v in data.items() if v is not None})


def simple_mail(i: int = 0, **changes: Any) -> Email:
    return parse_email(
        {"from": "a@example.com", "to": f"r{i}@example.com", "subject": f"s{i}", "text": "t", **changes}
    )


async def insert(store: MailStore, email: Email, priority: int = 1024) -> str:
    mail_id, new = await store.insert(MailStore.new_document(email, priority=priority))
    assert new
    return mail_id


def attempt(vendor: str, outcome: str, **kw: Any) -> Attempt:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    return Attempt(
        vendor=vendor,
        started_at=now - dt.timedelta(seconds=2),
        finished_at=now,
        outcome=outcome,  # type: ignore[arg-type]
        **kw,
    )


# --- round trips ---------------------------------------------------------------------


async def test_rich_mail_round_trips_equal(store: MailStore) -> None:
    email = rich_mail(idempotency_key="rt-1")
    before = dt.datetime.now(UTC)
    mail_id = await insert(store, email, priority=12)
    assert len(mail_id) == 24 and int(mail_id, 16) >= 0
    record = await store.get(mail_id)
    assert record.email == email
    assert record.email.attachments[0].content == bytes(range(256))
    assert record.email.cc[0].name == "Çé"
    assert record.email.send_at == email.send_at
    assert record.email.metadata == email.metadata
    assert record.id == mail_id
    assert record.status is Status.QUEUED
    assert record.idempotency_key == "rt-1"
    assert record.attempts == [] and record.rounds == 0 and record.job_id is None
    assert record.vendor is None and record.sent_at is None
    for stamp in (record.created_at, record.updated_at):
        assert isinstance(stamp, dt.datetime) and stamp.tzinfo is not None
        assert abs((stamp - before).total_seconds()) < 10
    raw = await store.mails.find_one({"_id": ObjectId(mail_id)})
    assert raw is not None
    assert raw["priority"] == 12
    assert isinstance(raw["mail"]["to"], list) and isinstance(raw["mail"]["to"][0], dict)
    assert isinstance(raw["mail"]["attachments"][0]["content"], bytes)
    assert isinstance(raw["mail"]["send_at"], dt.datetime)


async def test_minimal_mail_round_trips_and_has_no_key(store: MailStore) -> None:
    email = simple_mail()
    mail_id = await insert(store, email)
    assert (await store.get(mail_id)).email == email
    raw = await store.mails.find_one({"_id": ObjectId(mail_id)})
    assert raw is not None and "idempotency_key" not in raw  # sparse index: absent, not null


async def test_a_new_document_stores_only_what_is_read_and_reads_back_whole(store: MailStore) -> None:
    # Issue 16: each stored field costs every insert; what reads the same when absent is left out.
    email = simple_mail()
    mail_id = await insert(store, email)
    raw = await store.mails.find_one({"_id": ObjectId(mail_id)})
    assert raw is not None
    assert not {"updated_at", "rounds", "lease_until"} & set(raw), sorted(raw)
    assert set(raw["mail"]) == {"from_", "to", "subject", "text"}  # no empty defaults stored
    record = await store.get(mail_id)
    assert record.email == email and record.rounds == 0 and record.attempts == []
    assert record.updated_at == record.created_at
    # A claim's $inc creates ``rounds``; the claim reads back as it did with a stored 0.
    claim = await claiming.claim(store, ObjectId(mail_id), job_id=5, consumer="c", lease_s=60)
    assert claim.doc is not None and claim.doc["rounds"] == 1 and claim.doc["lease_until"] > time.time()


async def test_next_attempt_ts_follows_the_delay(store: MailStore) -> None:
    now = time.time()
    doc = MailStore.new_document(simple_mail(delay=600), priority=1)
    assert doc["next_attempt_ts"] == pytest.approx(now + 600, abs=5)
    doc = MailStore.new_document(simple_mail(), priority=1)
    assert doc["next_attempt_ts"] == pytest.approx(now, abs=5)


async def test_get_unknown_or_malformed_id(store: MailStore) -> None:
    with pytest.raises(MailNotFound, match="no mail with id"):
        await store.get(str(ObjectId()))
    with pytest.raises(MailNotFound):
        await store.get("not-an-id")
    assert isinstance(MailNotFound("x"), StoreError)


def test_parse_mail_id() -> None:
    oid = ObjectId()
    assert parse_mail_id(str(oid)) == oid
    assert parse_mail_id(str(oid).encode()) == oid
    assert parse_mail_id(f" {oid}\r\n".encode()) == oid
    for bad in ("", "xyz", "z" * 24, str(oid) + "0", b"\xff" * 24):
        assert parse_mail_id(bad) is None


async def test_delete(store: MailStore) -> None:
    mail_id = await insert(store, simple_mail())
    assert await store.delete(mail_id) is True
    assert await store.delete(mail_id) is False
    assert await store.delete("junk") is False


# --- claim and finish ----------------------------------------------------------------


async def test_claim_then_finish_reads_back_typed(store: MailStore) -> None:
    email = rich_mail()
    mail_id = await insert(store, email)
    oid = ObjectId(mail_id)
    created = (await store.get(mail_id)).created_at
    claim = await claiming.claim(store, oid, job_id=77, consumer="c1", lease_s=60)
    assert claim.state is ClaimState.CLAIMED
    assert claim.doc is not None
    assert claim.doc["status"] == "sending" and claim.doc["job_id"] == 77 and claim.doc["rounds"] == 1
    assert claim.doc.get("attempts", []) == []  # not stored until a round writes the list
    assert claim.email == email
    assert isinstance(claim.doc["updated_at"], dt.datetime)

    failed = attempt("mailgun", "transient", error="503 from mailgun", job_id=77, consumer="c1")
    sent = attempt("sparkpost", "sent", message_id="sp-123", job_id=77, consumer="c1")
    await store.finish_many(
        [
            Finish(
                mail_id,
                Status.SENT,
                [*claim.doc.get("attempts", []), attempt_doc(failed), attempt_doc(sent)],
                vendor="sparkpost",
                message_id="sp-123",
            )
        ]
    )

    raw = await store.mails.find_one({"_id": oid})
    assert raw is not None
    # The quirks this catches: attempts must be sub-documents, not JSON strings, and the
    # datetimes inside them and on the mail must be datetimes, not strings.
    assert isinstance(raw["attempts"], list) and len(raw["attempts"]) == 2
    for a in raw["attempts"]:
        assert isinstance(a, dict), f"attempt stored as {type(a).__name__}: {a!r}"
        assert isinstance(a["started_at"], dt.datetime) and isinstance(a["finished_at"], dt.datetime)
    assert isinstance(raw["updated_at"], dt.datetime), repr(raw["updated_at"])
    assert isinstance(raw["sent_at"], dt.datetime), repr(raw["sent_at"])

    record = await store.get(mail_id)
    assert record.status is Status.SENT
    assert record.vendor == "sparkpost" and record.message_id == "sp-123"
    assert record.job_id == 77 and record.rounds == 1 and record.error is None
    assert record.attempts == [failed, sent]
    assert record.attempts[0].error == "503 from mailgun"
    assert record.attempts[1].started_at == sent.started_at
    assert record.attempts[1].finished_at.tzinfo is not None
    assert (
        record.updated_at.tzinfo is not None
        and record.sent_at is not None
        and record.sent_at.tzinfo is not None
    )
    assert record.updated_at >= created
    assert abs((record.sent_at - dt.datetime.now(UTC)).total_seconds()) < 30
    assert record.email == email


async def test_finish_many_writes_every_mail_and_keeps_earlier_attempts(store: MailStore) -> None:
    ids = [await insert(store, simple_mail(i)) for i in range(5)]
    first = attempt("amazon", "transient", error="throttled")
    finishes = []
    for mail_id in ids:
        claim = await claiming.claim(store, ObjectId(mail_id), job_id=1, consumer="c", lease_s=60)
        assert claim.state is ClaimState.CLAIMED
        finishes.append(
            Finish(mail_id, Status.RETRYING, [attempt_doc(first)], error="throttled", next_attempt_ts=5.0)
        )
    await store.finish_many(finishes)
    for mail_id in ids:
        r = await store.get(mail_id)
        assert r.status is Status.RETRYING and r.error == "throttled" and r.attempts == [first]
        assert r.vendor is None and r.sent_at is None
    # Round two: the claim hands back the stored attempts, as dicts, to extend.
    claim = await claiming.claim(store, ObjectId(ids[0]), job_id=2, consumer="c", lease_s=60)
    assert claim.state is ClaimState.CLAIMED and claim.doc is not None
    assert claim.doc["rounds"] == 2
    assert [Attempt.model_validate(a) for a in claim.doc["attempts"]] == [first]
    second = attempt("mailgun", "permanent", error="bad recipient")
    await store.finish_many(
        [
            Finish(
                ids[0],
                Status.FAILED,
                [*claim.doc.get("attempts", []), attempt_doc(second)],
                error="bad recipient",
            )
        ]
    )
    r = await store.get(ids[0])
    assert r.status is Status.FAILED and r.attempts == [first, second] and r.error == "bad recipient"
    await store.finish_many([])  # nothing to do, no error


async def test_claim_semantics(store: MailStore) -> None:
    mail_id = await insert(store, simple_mail())
    oid = ObjectId(mail_id)
    assert (await claiming.claim(store, oid, job_id=1, consumer="a", lease_s=300)).state is ClaimState.CLAIMED
    # A second claim while the lease runs: BUSY (a twin job).
    busy = await claiming.claim(store, oid, job_id=2, consumer="b", lease_s=300)
    assert busy.state is ClaimState.BUSY
    assert busy.doc is not None and busy.doc["status"] == "sending"
    raw = await store.mails.find_one({"_id": oid})
    assert raw is not None and raw["consumer"] == "a" and raw["job_id"] == 1 and raw["rounds"] == 1

    # An unknown id: MISSING (a poison job).
    assert (
        await claiming.claim(store, ObjectId(), job_id=3, consumer="a", lease_s=300)
    ).state is ClaimState.MISSING

    # Sent: DONE (a redelivery), nothing changes.
    await store.finish_many([Finish(mail_id, Status.SENT, [], vendor="x", message_id="m")])
    done = await claiming.claim(store, oid, job_id=4, consumer="c", lease_s=300)
    assert done.state is ClaimState.DONE
    after = await store.get(mail_id)
    assert after.status is Status.SENT and after.job_id == 1 and after.rounds == 1


async def test_failed_mail_is_done(store: MailStore) -> None:
    mail_id = await insert(store, simple_mail())
    await claiming.claim(store, ObjectId(mail_id), job_id=1, consumer="a", lease_s=60)
    await store.finish_many([Finish(mail_id, Status.FAILED, [], error="nope")])
    assert (
        await claiming.claim(store, ObjectId(mail_id), job_id=2, consumer="a", lease_s=60)
    ).state is ClaimState.DONE


async def test_expired_lease_is_claimable_again(store: MailStore) -> None:
    mail_id = await insert(store, simple_mail())
    oid = ObjectId(mail_id)
    # A consumer whose lease is already over (it died).
    assert (
        await claiming.claim(store, oid, job_id=1, consumer="dead", lease_s=-1)
    ).state is ClaimState.CLAIMED
    taken = await claiming.claim(store, oid, job_id=2, consumer="alive", lease_s=300)
    assert taken.state is ClaimState.CLAIMED
    assert taken.doc is not None
    assert taken.doc["consumer"] == "alive" and taken.doc["job_id"] == 2 and taken.doc["rounds"] == 2
    assert taken.doc["lease_until"] > time.time() + 200


async def test_retrying_mail_is_claimable(store: MailStore) -> None:
    mail_id = await insert(store, simple_mail())
    await claiming.claim(store, ObjectId(mail_id), job_id=1, consumer="a", lease_s=60)
    await store.finish_many([Finish(mail_id, Status.RETRYING, [], next_attempt_ts=1.0)])
    assert (
        await claiming.claim(store, ObjectId(mail_id), job_id=2, consumer="b", lease_s=60)
    ).state is ClaimState.CLAIMED


async def test_release_claim_and_extend_lease(store: MailStore) -> None:
    mail_id = await insert(store, simple_mail())
    oid = ObjectId(mail_id)
    await claiming.claim(store, oid, job_id=1, consumer="a", lease_s=1)
    await store.extend_lease(oid, "a", 500)
    raw = await store.mails.find_one({"_id": oid})
    assert raw is not None and raw["lease_until"] > time.time() + 400
    await store.extend_lease(oid, "someone-else", 1)  # not theirs: no effect
    raw = await store.mails.find_one({"_id": oid})
    assert raw is not None and raw["lease_until"] > time.time() + 400
    await store.release_claim(oid)
    r = await store.get(mail_id)
    assert r.status is Status.QUEUED and isinstance(r.updated_at, dt.datetime)
    assert (await claiming.claim(store, oid, job_id=2, consumer="b", lease_s=60)).state is ClaimState.CLAIMED


async def test_concurrent_claims_one_winner(store: MailStore) -> None:
    mail_id = await insert(store, simple_mail())
    oid = ObjectId(mail_id)
    claims = await asyncio.gather(
        *(claiming.claim(store, oid, job_id=i, consumer=f"c{i}", lease_s=60) for i in range(20))
    )
    states = [c.state for c in claims]
    assert states.count(ClaimState.CLAIMED) == 1
    assert states.count(ClaimState.BUSY) == 19


# --- idempotency index ---------------------------------------------------------------


async def test_idempotency_key_returns_the_existing_id(store: MailStore) -> None:
    first = await insert(store, simple_mail(1, idempotency_key="order-7"))
    mail_id, new = await store.insert(
        MailStore.new_document(simple_mail(2, idempotency_key="order-7"), priority=1)
    )
    assert (mail_id, new) == (first, False)
    assert await store.mails.count_documents({"idempotency_key": {"$eq": "order-7"}}) == 1
    # The stored mail is the first one.
    assert (await store.get(first)).email.to[0].email == "r1@example.com"


async def test_many_mails_without_key_do_not_collide(store: MailStore) -> None:
    ids = [await insert(store, simple_mail(i)) for i in range(5)]
    results = await store.insert_many([MailStore.new_document(simple_mail(i), priority=1) for i in range(20)])
    assert all(new for _, new in results)
    assert len({*ids, *(i for i, _ in results)}) == 25
    assert await store.mails.count_documents({}) == 25


async def test_insert_many_with_known_and_repeated_keys(store: MailStore) -> None:
    known = await insert(store, simple_mail(0, idempotency_key="k-known"))
    docs = [
        MailStore.new_document(simple_mail(1), priority=1),
        MailStore.new_document(simple_mail(2, idempotency_key="k-known"), priority=1),
        MailStore.new_document(simple_mail(3, idempotency_key="k-new"), priority=1),
        MailStore.new_document(simple_mail(4, idempotency_key="k-new"), priority=1),
        MailStore.new_document(simple_mail(5), priority=1),
    ]
    results = await store.insert_many(docs)
    assert [new for _, new in results] == [True, False, True, False, True]
    assert results[1][0] == known
    assert results[3][0] == results[2][0]
    assert await store.mails.count_documents({}) == 4
    assert await store.insert_many([]) == []


async def test_indexes_exist(store: MailStore) -> None:
    info = await store.mails.index_information()
    key_index = [v for v in info.values() if v["key"] == [("idempotency_key", 1)]]
    assert key_index and key_index[0].get("unique") is True
    status = await store.mails.database.command("serverStatus")
    if status.get("process") != "nx_27017":  # nx-27017 does not list the sparse flag
        assert key_index[0].get("sparse") is True
    keys = [[tuple(k) for k in v["key"]] for v in info.values()]
    # The console's sort, (queued_ts, _id) newest first, alone and after status (whose
    # prefix serves claims and the sweep). nx-27017 refuses _id in a compound index and
    # lists every key ascending; MongoDB keeps both as given.
    if status.get("process") == "nx_27017":
        assert [("status", 1), ("queued_ts", 1)] in keys and [("queued_ts", 1)] in keys
    else:
        assert [("status", 1), ("queued_ts", -1), ("_id", -1)] in keys
        assert [("queued_ts", -1), ("_id", -1)] in keys
    assert [("status", 1)] not in keys  # the compound's prefix serves it: no second index to write
    await store.ensure_indexes()  # again: harmless


# --- vendor marks and counts ---------------------------------------------------------


async def test_vendor_marks_keep_the_later_time(store: MailStore) -> None:
    assert await store.vendor_marks() == {}
    now = time.time()
    await store.mark_vendor("mailgun", now + 100, "503")
    await store.mark_vendor("mailgun", now + 50, "timeout")  # earlier: the until stays
    await store.mark_vendor("amazon", now + 10, "throttled")
    marks = await store.vendor_marks()
    assert marks["mailgun"][0] == pytest.approx(now + 100)
    assert marks["mailgun"][1] == "timeout"
    assert marks["amazon"] == (pytest.approx(now + 10), "throttled")
    await store.mark_vendor("mailgun", now + 300, "x" * 900)
    marks = await store.vendor_marks()
    assert marks["mailgun"][0] == pytest.approx(now + 300)
    assert len(marks["mailgun"][1]) == 500
    await store.clear_vendor("mailgun")
    await store.clear_vendor("sparkpost")  # never marked: upserted as clear
    marks = await store.vendor_marks()
    assert marks["mailgun"] == (0.0, "")
    assert marks["sparkpost"] == (0.0, "")
    assert marks["amazon"][0] == pytest.approx(now + 10)


async def test_status_counts(store: MailStore) -> None:
    assert await store.status_counts() == {s.value: 0 for s in Status}
    ids = [await insert(store, simple_mail(i)) for i in range(6)]
    await claiming.claim(store, ObjectId(ids[0]), job_id=1, consumer="a", lease_s=60)
    for mail_id, status in ((ids[1], Status.SENT), (ids[2], Status.SENT), (ids[3], Status.FAILED)):
        await claiming.claim(store, ObjectId(mail_id), job_id=1, consumer="a", lease_s=60)
        await store.finish_many([Finish(mail_id, status, [], vendor="v", message_id="m")])
    counts = await store.status_counts()
    assert counts == {
        "queued": 2,
        "sending": 1,
        "retrying": 0,
        "sent": 2,
        "failed": 1,
        "cancelled": 0,
        "suppressed": 0,
    }


async def orphans(store: MailStore, **kw: Any) -> list[Doc]:
    return [doc async for chunk in store.find_orphans(**kw) for doc in chunk]


async def test_find_orphans_in_chunks_and_mark_requeued(store: MailStore) -> None:
    ids = [await insert(store, simple_mail(i)) for i in range(5)]
    await insert(store, simple_mail(9, delay=3600))
    now = time.time()
    chunks = [chunk async for chunk in store.find_orphans(older_than_s=0, now=now + 1, chunk=2)]
    assert [len(c) for c in chunks] == [2, 2, 1]
    seen = [d for c in chunks for d in c]
    assert sorted(str(d["_id"]) for d in seen) == sorted(ids)
    assert {"batch", "queued_ts", "priority"} <= set(seen[0])
    # Not stored at insert (each field costs every insert); absent reads as None.
    assert seen[0].get("requeued_ts") is None and seen[0].get("job_id") is None
    won = await store.mark_requeued(seen[:3], token="a", now=now)
    assert won == {d["_id"] for d in seen[:3]}
    # A second sweep that read the same documents loses the compare-and-set on those three.
    assert await store.mark_requeued(seen, token="b", now=now + 1) == {d["_id"] for d in seen[3:]}
    stored = await store.mails.find_one({"_id": seen[0]["_id"]})
    # (nx-27017 keeps about 15 significant digits of a double; MongoDB keeps all.)
    assert stored is not None and stored["requeue_token"] == "a"
    assert stored["requeued_ts"] == pytest.approx(now, abs=1e-3)
    assert stored["next_attempt_ts"] == pytest.approx(now, abs=1e-3)


async def test_mark_requeued_needs_the_mail_still_claimable_or_its_lease_expired(store: MailStore) -> None:
    ids = [await insert(store, simple_mail(i)) for i in range(3)]
    now = time.time() + 1
    seen = await orphans(store, older_than_s=0, now=now)
    # Meanwhile a consumer claimed one (live lease) and finished another.
    await claiming.claim(store, ObjectId(ids[0]), job_id=1, consumer="c", lease_s=60)
    await claiming.claim(store, ObjectId(ids[1]), job_id=2, consumer="c", lease_s=60)
    await store.finish_many([Finish(ids[1], Status.SENT, [], vendor="v", message_id="m")])
    assert await store.mark_requeued(seen, token="t", now=now) == {ObjectId(ids[2])}
    # A claim whose lease ran out is a candidate, and is won while it stays expired.
    dead = await insert(store, simple_mail(5))
    await claiming.claim(store, ObjectId(dead), job_id=3, consumer="gone", lease_s=-5)
    expired = [d for d in await orphans(store, older_than_s=0, now=now) if str(d["_id"]) == dead]
    assert len(expired) == 1 and expired[0]["status"] == "sending"
    assert await store.mark_requeued(expired, token="u", now=now) == {ObjectId(dead)}


async def test_receipts_and_job_ids_round_trip(store: MailStore) -> None:
    ids = [await insert(store, simple_mail(i)) for i in range(3)]
    assert await store.receipts(ids) == dict.fromkeys(ids)  # stored, no receipt yet
    await store.record_jobs(ids[0], {ids[0]: 7, ids[1]: 2**40})
    got = await store.receipts([ids[0], ids[1], "0" * 24, "not an id"])
    assert got == {ids[0]: {ids[0]: 7, ids[1]: 2**40}, ids[1]: None}
    await store.record_job_ids({ids[1]: 11, ids[2]: 12})
    assert (await store.get(ids[1])).job_id == 11 and (await store.get(ids[2])).job_id == 12
    await store.record_job_ids({})


def test_new_document_names_itself_its_batch_and_too_large_measures_bson() -> None:
    doc = MailStore.new_document(simple_mail(), priority=3)
    assert doc["batch"] == str(doc["_id"]) and doc["queued_ts"] == pytest.approx(time.time(), abs=5)
    assert MailStore.too_large(doc) is None
    attachment = {"filename": "a", "content": b"x" * (16 * 1024 * 1024)}
    big_mail = parse_email(
        {
            "from": "a@example.com",
            "to": "b@example.com",
            "subject": "s",
            "text": "t",
            "attachments": [attachment],
        },
        max_bytes=40_000_000,
    )
    big = MailStore.new_document(big_mail, priority=3)
    why = MailStore.too_large(big)
    assert why is not None and "16 MiB" in why and "attachments" in why


async def test_insert_many_after_a_whole_call_failure_writes_each_doc_alone(
    store: MailStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call timed out after MongoDB stored the batch: each doc is recognised as stored
    (and new, so it is still queued), a known key is still the earlier mail's."""
    earlier = await insert(store, simple_mail(0, idempotency_key="k1"))
    docs = [MailStore.new_document(simple_mail(i), priority=1) for i in range(3)]
    docs.append(MailStore.new_document(simple_mail(3, idempotency_key="k1"), priority=1))
    docs.append(MailStore.new_document(simple_mail(4), priority=1))
    real = store.mails.insert_many

    async def stores_then_times_out(batch: list[Doc], **kw: Any) -> Any:
        await real(batch[:3], **kw)
        raise NetworkTimeout("timed out")

    monkeypatch.setattr(store.mails, "insert_many", stores_then_times_out)
    out = await store.insert_many(docs)
    assert out[:3] == [(str(d["_id"]), True) for d in docs[:3]]
    assert out[3] == (earlier, False)
    assert out[4] == (str(docs[4]["_id"]), True)
    assert await store.mails.count_documents({}) == 5
    with pytest.raises(NetworkTimeout):  # one doc alone: unknown whether it was stored
        await store.insert_many([MailStore.new_document(simple_mail(5), priority=1)])


# --- lifecycle -----------------------------------------------------------------------


async def test_not_connected_store_raises(settings: Settings) -> None:
    store = MailStore(settings)
    with pytest.raises(StoreError, match="not connected"):
        _ = store.mails
    assert "connected=False" in repr(store)


async def test_unreachable_mongodb_is_a_store_error(settings: Settings) -> None:
    uri = SecretStr("mongodb://mailer:PASSW0RD-789@127.0.0.1:1/x")
    bad = settings.model_copy(
        update={"mongodb": settings.mongodb.model_copy(update={"uri": uri, "timeout_ms": 300})}
    )
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach MongoDB") as info:
        await MailStore(bad).connect()
    assert time.monotonic() - started < 5
    assert "PASSW0RD-789" not in str(info.value)
    assert info.value.__cause__ is None


def test_to_record_of_a_new_document() -> None:
    email = simple_mail()
    doc = MailStore.new_document(email, priority=3)
    record = to_record(doc)
    assert record.id == str(doc["_id"])
    assert record.status is Status.QUEUED and record.email == email
    assert record.created_at == record.updated_at == doc["created_at"]
    assert record.created_at.tzinfo is not None


# --- batched claims (update_many + find): conformance on nx-27017 and MongoDB -----------------


async def test_claim_many_claims_each_claimable_mail_once_and_explains_the_rest(store: MailStore) -> None:
    ids = [ObjectId(await insert(store, simple_mail(i))) for i in range(5)]
    done, gone = ids[3], ObjectId()
    await store.finish_many([Finish(str(done), Status.SENT, [], vendor="v", message_id="m")])
    leased = ids[4]
    await store.mails.update_one(
        {"_id": leased},
        {"$set": {"status": "sending", "consumer": "other", "lease_until": time.time() + 600}},
    )
    requests = [(ids[0], 10), (ids[1], 11), (ids[0], 12), (done, 13), (gone, 14), (leased, 15), (ids[2], 16)]
    claims = await claiming.claim_many(store, requests, consumer="me", lease_s=60)
    states = [c.state for c in claims]
    assert states == [
        ClaimState.CLAIMED,
        ClaimState.CLAIMED,
        ClaimState.BUSY,  # a second job for the same mail in the same batch is a twin
        ClaimState.DONE,
        ClaimState.MISSING,
        ClaimState.BUSY,
        ClaimState.CLAIMED,
    ]
    for claim, (_, job_id) in zip(claims, requests, strict=True):
        if claim.state is ClaimState.CLAIMED:
            assert claim.doc is not None and claim.doc["job_id"] == job_id and claim.doc["rounds"] == 1
            assert claim.email.subject.startswith("s")
    for oid in (ids[0], ids[1], ids[2]):
        raw = await store.mails.find_one({"_id": oid})
        assert (
            raw is not None and raw["status"] == "sending" and raw["consumer"] == "me" and raw["rounds"] == 1
        )
        assert raw["lease_until"] > time.time() + 50 and isinstance(raw["updated_at"], dt.datetime)
    # a second batch claims nothing more
    again = await claiming.claim_many(store, [(ids[0], 20), (ids[1], 21)], consumer="you", lease_s=60)
    assert [c.state for c in again] == [ClaimState.BUSY, ClaimState.BUSY]


async def test_claim_many_takes_over_expired_leases(store: MailStore) -> None:
    oid = ObjectId(await insert(store, simple_mail()))
    [first] = await claiming.claim_many(store, [(oid, 1)], consumer="dead", lease_s=-1)
    assert first.state is ClaimState.CLAIMED
    [taken] = await claiming.claim_many(store, [(oid, 2)], consumer="alive", lease_s=60)
    assert taken.state is ClaimState.CLAIMED and taken.doc is not None and taken.doc["rounds"] == 2
    raw = await store.mails.find_one({"_id": oid})
    assert raw is not None and raw["consumer"] == "alive"


async def test_concurrent_claim_many_never_claims_a_mail_twice(store: MailStore) -> None:
    ids = [ObjectId(await insert(store, simple_mail(i))) for i in range(60)]
    batches = [[(oid, n * 100 + i) for i, oid in enumerate(ids)] for n in range(4)]
    results = await asyncio.gather(
        *(claiming.claim_many(store, batch, consumer=f"c{n}", lease_s=60) for n, batch in enumerate(batches))
    )
    won = [
        oid
        for claims, batch in zip(results, batches, strict=True)
        for c, (oid, _) in zip(claims, batch, strict=True)
        if c.state is ClaimState.CLAIMED
    ]
    assert sorted(won) == sorted(ids)


async def test_a_bad_document_does_not_fail_the_whole_claim_batch(store: MailStore) -> None:
    good = ObjectId(await insert(store, simple_mail(1)))
    bad = ObjectId(await insert(store, simple_mail(2)))
    await store.mails.update_one({"_id": bad}, {"$set": {"status": "sending", "lease_until": "soon"}})
    claims = await claiming.claim_many(store, [(bad, 1), (good, 2)], consumer="me", lease_s=60)
    assert claims[0].state is ClaimState.ERROR and isinstance(claims[0].error, ValueError)
    assert claims[1].state is ClaimState.CLAIMED


async def test_extend_leases_extends_only_this_consumers_claims(store: MailStore) -> None:
    mine = [ObjectId(await insert(store, simple_mail(i))) for i in range(3)]
    theirs = ObjectId(await insert(store, simple_mail(9)))
    await claiming.claim_many(store, [(oid, i) for i, oid in enumerate(mine)], consumer="me", lease_s=5)
    await claiming.claim_many(store, [(theirs, 9)], consumer="them", lease_s=5)
    await store.extend_leases([*mine, theirs], "me", 600)
    for oid in mine:
        raw = await store.mails.find_one({"_id": oid})
        assert raw is not None and raw["lease_until"] > time.time() + 500
    raw = await store.mails.find_one({"_id": theirs})
    assert raw is not None and raw["lease_until"] < time.time() + 10


async def test_a_retry_record_is_not_written_over_a_claim_taken_over_by_another_consumer(
    store: MailStore,
) -> None:
    oid = ObjectId(await insert(store, simple_mail()))
    await claiming.claim_many(store, [(oid, 1)], consumer="slow", lease_s=-1)
    await claiming.claim_many(store, [(oid, 2)], consumer="new", lease_s=60)
    await store.finish_many([Finish(str(oid), Status.RETRYING, [], error="late", consumer="slow", job_id=1)])
    raw = await store.mails.find_one({"_id": oid})
    assert raw is not None and raw["status"] == "sending" and raw["consumer"] == "new"
    # ... but a send always is: it happened.
    await store.finish_many([Finish(str(oid), Status.SENT, [], vendor="v", message_id="m", consumer="slow")])
    raw = await store.mails.find_one({"_id": oid})
    assert raw is not None and raw["status"] == "sent"


# --- rate limits and throttle marks ---------------------------------------------------


async def test_count_sends_creates_the_window_and_returns_the_count_after_each_add(store: MailStore) -> None:
    try:
        await store.ensure_rate_indexes()
        assert await store.count_sends("mailgun:1", 3, ends=100.0) == 3  # upserted
        assert await store.count_sends("mailgun:1", 2, ends=100.0) == 5
        assert await store.count_sends("mailgun:2", 1, ends=200.0) == 1  # its own window
        counts = await asyncio.gather(*(store.count_sends("mailgun:3", 1, ends=300.0) for _ in range(20)))
        assert sorted(counts) == list(range(1, 21))  # atomic: no two adds saw the same count
        assert await store.drop_rate_windows(ended_before=250.0) == 2
        assert [d["_id"] async for d in store.rate_windows.find({})] == ["mailgun:3"]
    finally:
        await store.rate_windows.drop()


async def test_a_throttle_mark_never_shortens_a_longer_mark_nor_takes_its_reason(store: MailStore) -> None:
    now = time.time()
    assert await store.mark_vendor_throttled("sendinblue", now + 2, "throttled: 429")  # a new mark
    assert (await store.vendor_marks())["sendinblue"] == (pytest.approx(now + 2), "throttled: 429")
    await store.mark_vendor("mailgun", now + 600, "HTTP 503")
    assert not await store.mark_vendor_throttled("mailgun", now + 2, "throttled: HTTP 429")
    assert (await store.vendor_marks())["mailgun"] == (pytest.approx(now + 600), "HTTP 503")
    await store.mark_vendor("amazon", now - 5, "timed out")  # an expired outage mark
    assert await store.mark_vendor_throttled("amazon", now + 3, "throttled: SES 429")
    assert (await store.vendor_marks())["amazon"] == (pytest.approx(now + 3), "throttled: SES 429")


# --- cancel ---------------------------------------------------------------------------


async def test_cancel_is_a_compare_and_set_from_queued_or_retrying(store: MailStore) -> None:
    queued, retrying, sending, sent = [await insert(store, simple_mail(i)) for i in range(4)]
    for mail_id, status in ((retrying, "retrying"), (sending, "sending"), (sent, "sent")):
        await store.mails.update_one({"_id": ObjectId(mail_id)}, {"$set": {"status": status}})
    assert await store.cancel(ObjectId(queued)) is Status.CANCELLED
    assert await store.cancel(ObjectId(retrying)) is Status.CANCELLED
    assert await store.cancel(ObjectId(queued)) is Status.CANCELLED  # again: unchanged
    assert await store.cancel(ObjectId(sending)) is Status.SENDING
    assert await store.cancel(ObjectId(sent)) is Status.SENT
    assert await store.cancel(ObjectId()) is None
    record = await store.get(queued)
    assert record.status is Status.CANCELLED and record.updated_at >= record.created_at
    assert (await store.get(sending)).status is Status.SENDING
    # A cancelled mail is not claimable: the claim's compare-and-set does not take it.
    assert await store.claim_one(ObjectId(queued), job_id=1, consumer="c1", token="t", lease_s=60) is None


async def test_cancel_and_claim_race_one_wins(store: MailStore) -> None:
    ids = [await insert(store, simple_mail(i)) for i in range(20)]
    results = await asyncio.gather(
        *(store.cancel(ObjectId(i)) for i in ids),
        *(
            store.claim_one(ObjectId(i), job_id=n, consumer="c1", token="t", lease_s=60)
            for n, i in enumerate(ids)
        ),
    )
    cancels, claims = results[:20], results[20:]
    for mail_id, cancel, claim in zip(ids, cancels, claims, strict=True):
        won_claim = claim is not None
        assert won_claim != (cancel is Status.CANCELLED), mail_id
        final = (await store.get(mail_id)).status
        assert final is (Status.SENDING if won_claim else Status.CANCELLED)


async def test_heartbeats_round_trip_and_live_means_recent_and_of_the_tube(settings: Settings) -> None:
    settings = settings.model_copy(
        update={
            "consumer": settings.consumer.model_copy(
                update={"heartbeat_collection": f"consumers_{ObjectId()}"}
            )
        }
    )
    async with MailStore(settings) as store:
        try:
            assert await store.ping() >= 0
            before = time.time()
            await store.heartbeat("h:1:a", host="h", pid=1, tube="t1", started=before)
            await store.heartbeat("h:2:b", host="h", pid=2, tube="t2", started=before)
            await store.heartbeat("h:1:a", host="h", pid=1, tube="t1", started=before)  # an upsert
            live = await store.live_consumers("t1", seen_since=before)
            assert [(d["_id"], d["host"], d["pid"], d["tube"]) for d in live] == [("h:1:a", "h", 1, "t1")]
            assert live[0]["started"] == pytest.approx(before, abs=1e-3)  # the local server keeps ~us
            assert live[0]["seen"] >= before - 1e-3
            assert await store.live_consumers("t1", seen_since=time.time() + 60) == []
            await store.drop_heartbeat("h:1:a")
            assert await store.live_consumers("t1", seen_since=0) == []
        finally:
            await store.consumers.drop()
