"""Handling one job end to end against the real beanstalkd and nx-27017, with FakeVendors:
the test reserves each job itself and hands it to the consumer's Delivery, so every
outcome (sent, fail-over, retry, failed, bury, delete) is checked exactly, one job at a time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from bson import ObjectId
from helpers import (
    VENDOR_NAMES,
    FakeClock,
    MakeSettings,
    delivery_rig,
    fake_vendors,
    job_stats,
    kick_job,
    produce,
    put_bodies,
    vendor_mark,
    wait_until,
    with_consumer,
)

from mailer import claims as claiming
from mailer.config import Settings
from mailer.delivery import Action, Committer, backoff_delay
from mailer.errors import PermanentVendorError, TransientVendorError, VendorAuthError
from mailer.models import Status
from mailer.store import Finish, MailStore

COOLDOWN = 600.0


def next_of(name: str) -> str:
    return VENDOR_NAMES[(VENDOR_NAMES.index(name) + 1) % len(VENDOR_NAMES)]


# --- pure pieces -----------------------------------------------------------------------


def test_backoff_grows_exponentially_and_is_capped() -> None:
    assert [backoff_delay(r, 30, 3600) for r in range(1, 9)] == [30, 60, 120, 240, 480, 960, 1920, 3600]
    assert backoff_delay(0, 30, 3600) == 30
    assert backoff_delay(50, 30, 3600) == 3600
    assert backoff_delay(3, 0, 3600) == 0


async def test_committer_groups_many_updates_into_one_bulk_write(settings: Settings) -> None:
    ids = await produce(settings, 30)
    async with MailStore(settings) as store:
        calls: list[int] = []
        real = store.finish_many

        async def counting(finishes: Any) -> None:
            batch = list(finishes)
            calls.append(len(batch))
            await real(batch)

        store.finish_many = counting  # type: ignore[method-assign]
        # Natural group commit: what arrives before the writer runs (or while it writes) goes together.
        committer = Committer(store, batch=200)
        await asyncio.gather(*(committer.commit(Finish(i, Status.FAILED, [], error="x")) for i in ids))
        assert calls == [30]
        assert await store.mails.count_documents({"status": "failed"}) == 30

        committer = Committer(store, batch=10)  # no batch exceeds its size
        calls.clear()
        await asyncio.wait_for(
            asyncio.gather(*(committer.commit(Finish(i, Status.FAILED, [], error="y")) for i in ids)), 5
        )
        assert calls == [10, 10, 10]
        await committer.close()


async def test_committer_failure_reaches_every_waiting_caller(settings: Settings) -> None:
    async with MailStore(settings) as store:

        async def broken(finishes: Any) -> None:
            raise RuntimeError("MongoDB away")

        store.finish_many = broken  # type: ignore[method-assign]
        committer = Committer(store, batch=200)
        results = await asyncio.gather(
            *(committer.commit(Finish(str(ObjectId()), Status.SENT, [])) for _ in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, RuntimeError) for r in results)


# --- success ---------------------------------------------------------------------------


async def test_sent_mail_is_recorded_before_its_job_is_deleted(settings: Settings) -> None:
    vendors = fake_vendors()
    [mail_id] = await produce(settings, 1)
    async with delivery_rig(settings, vendors) as rig:
        job, settle = await rig.step()
        doc = await rig.doc(mail_id)
    picked = VENDOR_NAMES[job.id % 4]
    assert settle.action is Action.DELETE
    assert await job_stats(settings, job.id) is None
    assert doc["status"] == "sent"
    assert doc["vendor"] == picked and doc["job_id"] == job.id
    assert doc["message_id"].startswith(f"fake-{picked}-")
    assert doc["sent_at"] is not None and doc["lease_until"] == 0.0 and doc["rounds"] == 1
    [attempt] = doc["attempts"]
    assert isinstance(attempt, dict)
    assert attempt["vendor"] == picked and attempt["outcome"] == "sent"
    assert attempt["message_id"] == doc["message_id"] and attempt["job_id"] == job.id
    assert attempt["consumer"] == rig.consumer.consumer_id
    assert attempt["finished_at"] >= attempt["started_at"]
    assert rig.sends() == {n: int(n == picked) for n in VENDOR_NAMES}


# --- vendor errors ---------------------------------------------------------------------


async def test_transient_error_fails_over_to_the_next_vendor_and_marks_the_failing_one(
    settings: Settings,
) -> None:
    clock = FakeClock()
    vendors = fake_vendors()
    ids = await produce(settings, 6)
    async with delivery_rig(settings, vendors, clock=clock) as rig:
        job = await rig.reserve()
        down = rig.picked(job)
        down.default = TransientVendorError(down.name, "503 service unavailable")
        assert (await rig.handle(job)).action is Action.DELETE
        first = await rig.doc(ids[0])
        assert first["status"] == "sent" and first["vendor"] == next_of(down.name)
        assert [(a["vendor"], a["outcome"]) for a in first["attempts"]] == [
            (down.name, "transient"),
            (next_of(down.name), "sent"),
        ]
        assert "503" in first["attempts"][0]["error"]
        mark = await wait_until(lambda: vendor_mark(rig.store, down.name), what="the vendor mark")
        assert mark["until"] == pytest.approx(clock() + COOLDOWN)
        # later jobs skip it: the other three share the load by job id
        for _ in range(5):
            await rig.step()
        docs = [await rig.doc(i) for i in ids[1:]]
    assert all(d["status"] == "sent" and len(d["attempts"]) == 1 for d in docs)
    up = [n for n in VENDOR_NAMES if n != down.name]
    assert all(d["vendor"] == up[d["job_id"] % 3] for d in docs)
    assert len(down.sends) == 1


async def test_permanent_error_fails_the_mail_at_once_and_keeps_the_vendor(settings: Settings) -> None:
    vendors = fake_vendors()
    for v in vendors:
        v.default = PermanentVendorError(v.name, "550 mailbox does not exist")
    [mail_id] = await produce(settings, 1)
    async with delivery_rig(settings, vendors) as rig:
        job, settle = await rig.step()
        doc = await rig.doc(mail_id)
        picked = rig.picked(job)
        assert rig.registry.is_available(picked.name)
        assert not rig.registry._breakers[picked.name].probing
        assert rig.sends() == {n: int(n == picked.name) for n in VENDOR_NAMES}  # no other vendor tried
        await asyncio.sleep(0.05)  # a mark would be written in the background
        assert await vendor_mark(rig.store, picked.name) is None
    assert settle.action is Action.DELETE
    assert await job_stats(settings, job.id) is None
    assert doc["status"] == "failed" and doc["error"] == "550 mailbox does not exist"
    assert [(a["vendor"], a["outcome"], a["error"]) for a in doc["attempts"]] == [
        (picked.name, "permanent", "550 mailbox does not exist")
    ]


async def test_auth_error_marks_the_vendor_and_the_mail_goes_out_through_the_next(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    vendors = fake_vendors()
    [mail_id] = await produce(settings, 1)
    async with delivery_rig(settings, vendors, clock=clock) as rig:
        job = await rig.reserve()
        bad = rig.picked(job)
        bad.default = VendorAuthError(bad.name, "401 invalid API key")
        await rig.handle(job)
        doc = await rig.doc(mail_id)
        assert not rig.registry.is_available(bad.name)
        mark = await wait_until(lambda: vendor_mark(rig.store, bad.name), what="the vendor mark")
    assert mark["until"] == pytest.approx(clock() + COOLDOWN) and "401" in mark["reason"]
    assert doc["status"] == "sent" and doc["vendor"] == next_of(bad.name)
    assert [a["outcome"] for a in doc["attempts"]] == ["auth", "sent"]
    assert any(r.levelname == "ERROR" and bad.name in r.getMessage() for r in caplog.records)


async def test_ambiguous_transient_error_is_recorded_unknown_and_fails_over(settings: Settings) -> None:
    vendors = fake_vendors()
    [mail_id] = await produce(settings, 1)
    async with delivery_rig(settings, vendors) as rig:
        job = await rig.reserve()
        slow = rig.picked(job)
        slow.default = TransientVendorError(slow.name, "read timed out after sending", ambiguous=True)
        await rig.handle(job)
        doc = await rig.doc(mail_id)
        assert not rig.registry.is_available(slow.name)
    assert doc["status"] == "sent" and doc["vendor"] == next_of(slow.name)
    assert [(a["vendor"], a["outcome"]) for a in doc["attempts"]] == [
        (slow.name, "unknown"),
        (next_of(slow.name), "sent"),
    ]


async def test_an_adapter_bug_counts_as_an_unknown_outcome_and_fails_over(settings: Settings) -> None:
    vendors = fake_vendors()
    [mail_id] = await produce(settings, 1)
    async with delivery_rig(settings, vendors) as rig:
        job = await rig.reserve()
        buggy = rig.picked(job)

        def crash(email: object, mail_id: str) -> None:
            raise KeyError("oops")

        buggy.default = crash  # type: ignore[assignment]
        await rig.handle(job)
        doc = await rig.doc(mail_id)
    assert doc["status"] == "sent"
    assert [a["outcome"] for a in doc["attempts"]] == ["unknown", "sent"]
    assert "KeyError" in doc["attempts"][0]["error"]


async def test_retry_after_longer_than_the_cooldown_extends_the_shared_mark(settings: Settings) -> None:
    clock = FakeClock()
    vendors = fake_vendors()
    await produce(settings, 5)
    async with delivery_rig(settings, vendors, clock=clock) as rig:
        job = await rig.reserve()
        busy = rig.picked(job)
        busy.script.append(TransientVendorError(busy.name, "429 slow down", retry_after=3 * COOLDOWN))
        await rig.handle(job)
        mark = await wait_until(lambda: vendor_mark(rig.store, busy.name), what="the vendor mark")
        assert mark["until"] == pytest.approx(clock() + 3 * COOLDOWN)
        clock.advance(COOLDOWN + 1)  # past the cooldown, not past the Retry-After
        for _ in range(4):
            await rig.step()
        assert len(busy.sends) == 1
        clock.advance(2 * COOLDOWN)
        assert rig.registry.is_available(busy.name)


# --- every vendor down -----------------------------------------------------------------


async def test_every_vendor_down_retries_with_growing_delays_then_fails_and_buries(
    make_settings: MakeSettings,
) -> None:
    settings = with_consumer(
        await make_settings(),
        vendor_cooldown_s=0.0,  # every round may try every vendor again
        backoff_base_s=10.0,
        backoff_cap_s=1000.0,
        max_attempts=3,
    )
    clock = FakeClock()
    vendors = fake_vendors()
    for v in vendors:
        v.default = TransientVendorError(v.name, f"{v.name} 503")
    [mail_id] = await produce(settings, 1)
    delays, next_ts = [], []
    async with delivery_rig(settings, vendors, clock=clock) as rig:
        for round_ in (1, 2):
            job, settle = await rig.step()
            assert settle.action is Action.RELEASE
            doc = await rig.doc(mail_id)
            assert doc["status"] == "retrying" and doc["rounds"] == round_
            assert len(doc["attempts"]) == 4 * round_
            stats = await job_stats(settings, job.id)
            assert stats is not None and stats["state"] == "delayed"
            delays.append(stats["delay"])
            next_ts.append(doc["next_attempt_ts"])
            clock.advance(1)
            await kick_job(settings, job.id)  # do not wait out the back-off
        job, settle = await rig.step()
        doc = await rig.doc(mail_id)
    assert delays == [10, 20]
    assert next_ts[1] - next_ts[0] == pytest.approx(1 + 20 - 10)
    assert settle.action is Action.BURY
    stats = await job_stats(settings, job.id)
    assert stats is not None and stats["state"] == "buried"
    assert doc["status"] == "failed" and doc["rounds"] == 3
    assert doc["error"].startswith("gave up after 3 rounds") and "503" in doc["error"]
    # every attempt recorded: 3 rounds x 4 vendors, in round-robin order from the pick
    assert len(doc["attempts"]) == 12
    assert {a["outcome"] for a in doc["attempts"]} == {"transient"}
    start = job.id % 4
    assert [a["vendor"] for a in doc["attempts"][:4]] == list(VENDOR_NAMES[start:] + VENDOR_NAMES[:start])
    assert {v.name: len(v.sends) for v in vendors} == dict.fromkeys(VENDOR_NAMES, 3)


async def test_with_no_vendor_available_the_job_waits_for_the_first_to_come_back(
    make_settings: MakeSettings,
) -> None:
    settings = with_consumer(await make_settings(), backoff_base_s=1.0, backoff_cap_s=3600.0)
    clock = FakeClock()
    vendors = fake_vendors()
    for v in vendors:
        v.script.append(TransientVendorError(v.name, "connection refused"))  # down once each
    [mail_id] = await produce(settings, 1)
    async with delivery_rig(settings, vendors, clock=clock) as rig:
        job, settle = await rig.step()
        # back-off 1 s, but no vendor can take it before the cooldown ends
        assert settle.action is Action.RELEASE and settle.delay == pytest.approx(COOLDOWN, abs=1)
        await kick_job(settings, job.id)
        job, settle = await rig.step()  # still inside the cooldown: nobody is tried
        assert settle.action is Action.RELEASE and COOLDOWN - 1 <= settle.delay <= COOLDOWN + 1
        doc = await rig.doc(mail_id)
        assert doc["status"] == "retrying"
        assert doc["attempts"][-1]["vendor"] == "-" and doc["attempts"][-1]["outcome"] == "unavailable"
        assert sum(rig.sends().values()) == 4
        clock.advance(COOLDOWN + 1)  # half-open: the next send probes
        await kick_job(settings, job.id)
        job, settle = await rig.step()
        doc = await rig.doc(mail_id)
    assert settle.action is Action.DELETE
    assert doc["status"] == "sent" and doc["rounds"] == 3 and len(doc["attempts"]) == 6


# --- poison and stale jobs -------------------------------------------------------------


async def test_poison_bodies_are_buried(settings: Settings) -> None:
    missing = str(ObjectId()).encode()
    await put_bodies(settings, b"not-a-mail-id", b"\xff\xfe binary", missing)
    async with delivery_rig(settings, fake_vendors()) as rig:
        results = [await rig.step() for _ in range(3)]
        assert sum(rig.sends().values()) == 0
    for job, settle in results:
        assert settle.action is Action.BURY
        stats = await job_stats(settings, job.id)
        assert stats is not None and stats["state"] == "buried"
    assert [s.reason for _, s in results] == ["not a mail id", "not a mail id", "no such mail"]


@pytest.mark.parametrize(
    "broken",
    [
        {"mail": {"from_": 42, "to": "nobody"}},
        {"mail": "a string"},
        {},
    ],
    ids=["bad-fields", "not-a-document", "no-mail"],
)
async def test_corrupted_stored_mail_fails_with_a_reason_and_is_buried(
    settings: Settings, broken: dict[str, Any]
) -> None:
    oid = ObjectId()
    async with MailStore(settings) as store:
        doc = {"_id": oid, "status": "queued", "rounds": 0, "attempts": [], "lease_until": 0.0, **broken}
        await store.mails.insert_one(doc)
    [job_id] = await put_bodies(settings, str(oid).encode())
    async with delivery_rig(settings, fake_vendors()) as rig:
        job, settle = await rig.step()
        doc = await rig.doc(str(oid))
        assert sum(rig.sends().values()) == 0
    assert job.id == job_id and settle.action is Action.BURY
    assert doc["status"] == "failed" and doc["error"].startswith("stored mail is corrupted")
    stats = await job_stats(settings, job_id)
    assert stats is not None and stats["state"] == "buried"


async def test_redelivered_job_of_a_sent_mail_sends_nothing_and_is_deleted(settings: Settings) -> None:
    vendors = fake_vendors()
    [mail_id] = await produce(settings, 1)
    async with delivery_rig(settings, vendors) as rig:
        await rig.step()
        before = await rig.doc(mail_id)
        [again] = await put_bodies(settings, mail_id.encode())
        job, settle = await rig.step()
        after = await rig.doc(mail_id)
    assert job.id == again and settle.action is Action.DELETE and settle.reason == "already finished"
    assert await job_stats(settings, again) is None
    assert sum(len(v.sends) for v in vendors) == 1
    assert after == before


async def test_redelivered_job_of_a_failed_mail_sends_nothing_and_is_deleted(settings: Settings) -> None:
    vendors = fake_vendors()
    for v in vendors:
        v.default = PermanentVendorError(v.name, "bad address")
    [mail_id] = await produce(settings, 1)
    async with delivery_rig(settings, vendors) as rig:
        await rig.step()
        await put_bodies(settings, mail_id.encode())
        _, settle = await rig.step()
        doc = await rig.doc(mail_id)
    assert settle.action is Action.DELETE and doc["status"] == "failed"
    assert sum(len(v.sends) for v in vendors) == 1


async def test_twin_job_under_another_consumers_live_lease_is_deleted_unsent(settings: Settings) -> None:
    [mail_id] = await produce(settings, 1)
    async with MailStore(settings) as store:
        await store.mails.update_one(
            {"_id": ObjectId(mail_id)},
            {"$set": {"status": "sending", "consumer": "other:1:abc", "lease_until": time.time() + 600}},
        )
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        job, settle = await rig.step()
        doc = await rig.doc(mail_id)
    assert settle.action is Action.TWIN and settle.reason == "twin"
    assert await job_stats(settings, job.id) is None
    assert sum(len(v.sends) for v in vendors) == 0
    assert doc["status"] == "sending" and doc["consumer"] == "other:1:abc"


async def test_the_same_job_back_under_its_own_live_lease_waits_the_lease_out(settings: Settings) -> None:
    # Its consumer died (or lost beanstalkd): the job is the mail's only one, so it must not be
    # dropped as a twin; it comes back once the lease has run out.
    [mail_id] = await produce(settings, 1)
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        job = await rig.reserve()
        await rig.store.mails.update_one(
            {"_id": ObjectId(mail_id)},
            {
                "$set": {
                    "status": "sending",
                    "consumer": "dead:1:x",
                    "job_id": job.id,
                    "lease_until": time.time() + 5,
                }
            },
        )
        settle = await rig.handle(job)
        doc = await rig.doc(mail_id)
    assert settle.action is Action.RELEASE and 5 <= settle.delay <= 7
    stats = await job_stats(settings, job.id)
    assert stats is not None and stats["state"] == "delayed"
    assert sum(len(v.sends) for v in vendors) == 0
    assert doc["status"] == "sending" and doc.get("rounds", 0) == 0


async def test_expired_lease_of_a_dead_consumer_is_taken_over(settings: Settings) -> None:
    [mail_id] = await produce(settings, 1)
    async with MailStore(settings) as store:
        await store.mails.update_one(
            {"_id": ObjectId(mail_id)},
            {"$set": {"status": "sending", "consumer": "dead:1:abc", "lease_until": time.time() - 1}},
        )
    async with delivery_rig(settings, fake_vendors()) as rig:
        _, settle = await rig.step()
        doc = await rig.doc(mail_id)
        assert doc["consumer"] == rig.consumer.consumer_id
    assert settle.action is Action.DELETE and doc["status"] == "sent"


async def test_a_retrying_mail_is_claimed_again_when_its_job_comes_back(settings: Settings) -> None:
    [mail_id] = await produce(settings, 1)
    async with MailStore(settings) as store:
        await store.mails.update_one(
            {"_id": ObjectId(mail_id)}, {"$set": {"status": "retrying", "rounds": 1}}
        )
    async with delivery_rig(settings, fake_vendors()) as rig:
        await rig.step()
        doc = await rig.doc(mail_id)
    assert doc["status"] == "sent" and doc["rounds"] == 2


# --- claims that do not take, own leases, fences (issue: reliability) ----------------------


class _DeafWrites:
    """A mails collection whose claim writes match nothing, with no error: what nx-27017
    answers on a full disk (and what a lost race looks like). Everything else goes through."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.claims = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def find_one_and_update(self, *args: Any, **kwargs: Any) -> None:
        self.claims += 1
        return None

    async def update_many(self, *args: Any, **kwargs: Any) -> Any:
        self.claims += 1
        return None


async def test_a_claim_that_does_not_take_keeps_the_job_and_puts_it_off(settings: Settings) -> None:
    [mail_id] = await produce(settings, 1)
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        real = rig.store.mails
        deaf = _DeafWrites(real)
        rig.store._mails = deaf  # type: ignore[assignment]
        job, settle = await rig.step()
        # bounded: a few tries, then the job is released with a delay, never deleted as a twin
        assert settle.action is Action.RELEASE and settle.reason == "claim did not take"
        assert settle.delay >= 1 and 2 <= deaf.claims <= 4
        stats = await job_stats(settings, job.id)
        assert stats is not None and stats["state"] == "delayed"
        rig.store._mails = real
        assert (await rig.doc(mail_id))["status"] == "queued"
        await kick_job(settings, job.id)
        _, settle = await rig.step()
        assert settle.action is Action.DELETE and (await rig.doc(mail_id))["status"] == "sent"
    assert sum(len(v.sends) for v in vendors) == 1


async def test_taking_over_an_expired_lease_is_bounded(settings: Settings) -> None:
    [mail_id] = await produce(settings, 1)
    async with MailStore(settings) as store:
        await store.mails.update_one(
            {"_id": ObjectId(mail_id)},
            {"$set": {"status": "sending", "consumer": "dead:1:x", "claim": "t", "lease_until": 1.0}},
        )
    async with delivery_rig(settings, fake_vendors()) as rig:
        deaf = _DeafWrites(rig.store.mails)
        rig.store._mails = deaf  # type: ignore[assignment]
        job, settle = await rig.step()  # no RecursionError, no bury
    assert settle.action is Action.RELEASE and settle.reason == "claim did not take"
    assert deaf.claims <= 4
    stats = await job_stats(settings, job.id)
    assert stats is not None and stats["state"] == "delayed"


async def test_a_claim_of_its_own_that_it_no_longer_holds_is_taken_back_at_once(settings: Settings) -> None:
    # The claim was applied but its reply timed out: the job came back to this very consumer,
    # which must not wait the whole lease (TTR) for itself.
    [mail_id] = await produce(settings, 1)
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        job = await rig.reserve()
        await claiming.claim(
            rig.store, ObjectId(mail_id), job_id=job.id, consumer=rig.consumer.consumer_id, lease_s=600
        )
        settle = await rig.handle(job)
        doc = await rig.doc(mail_id)
    assert settle.action is Action.DELETE and doc["status"] == "sent"
    assert sum(len(v.sends) for v in vendors) == 1


async def test_an_adapter_bug_on_one_mail_does_not_take_the_vendor_away(settings: Settings) -> None:
    settings = with_consumer(settings, vendor_cooldown_s=COOLDOWN)
    ids = await produce(settings, 24)
    vendors = fake_vendors()
    crashes: list[str] = []

    def crash(email: object, mail_id: str) -> None:
        crashes.append(mail_id)
        raise ValueError("adapter bug")

    async with delivery_rig(settings, vendors) as rig:
        buggy = rig.vendor(VENDOR_NAMES[0])
        buggy.default = crash  # type: ignore[assignment]
        available_after: dict[int, bool] = {}  # crashes so far -> is the vendor still available
        for _ in ids:
            await rig.step()
            available_after[len(crashes)] = rig.registry.is_available(buggy.name)
        final = [await rig.doc(i) for i in ids]
        mark = await vendor_mark(rig.store, buggy.name)
    assert all(d["status"] == "sent" for d in final)  # each failed over
    # one odd mail (or four) never takes the vendor away; five distinct mails alike do
    assert all(available_after[n] for n in range(1, 5))
    assert available_after[5] is False and len(crashes) == 5
    assert mark is not None and "5 mails failed alike" in mark["reason"]


async def test_a_vendor_that_cannot_carry_a_mail_is_skipped_without_a_mark(settings: Settings) -> None:
    from mailer.errors import UnsupportedByVendor

    [mail_id] = await produce(settings, 1)
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        job = await rig.reserve()
        picked = rig.picked(job)
        picked.default = UnsupportedByVendor(picked.name, "4 tags; takes at most 3")
        await rig.handle(job)
        doc = await rig.doc(mail_id)
        assert rig.registry.is_available(picked.name)
    assert doc["status"] == "sent" and doc["vendor"] == next_of(picked.name)
    assert [a["outcome"] for a in doc["attempts"]] == ["unsupported", "sent"]


async def test_a_mail_no_vendor_can_carry_fails_with_every_refusal(settings: Settings) -> None:
    from mailer.errors import UnsupportedByVendor

    [mail_id] = await produce(settings, 1)
    vendors = fake_vendors()
    for v in vendors:
        v.default = UnsupportedByVendor(v.name, f"{v.name} cannot")
    async with delivery_rig(settings, vendors) as rig:
        job, settle = await rig.step()
        doc = await rig.doc(mail_id)
        assert all(rig.registry.is_available(v.name) for v in vendors)
    assert settle.action is Action.DELETE and await job_stats(settings, job.id) is None
    assert doc["status"] == "failed"
    assert doc["error"].startswith("no enabled vendor can carry this mail")
    assert all(f"{v.name}: {v.name} cannot" in doc["error"] for v in vendors)


async def test_timeouts_caused_by_our_own_stall_do_not_mark_the_vendor(settings: Settings) -> None:
    settings = with_consumer(settings, vendor_cooldown_s=COOLDOWN)
    [mail_id] = await produce(settings, 1)
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        job = await rig.reserve()
        picked = rig.picked(job)
        stalls = rig.consumer.stalls

        def frozen(email: object, mail_id: str) -> TransientVendorError:
            now = time.monotonic()
            stalls.stalls.append((now - 30, now))  # the process stood still for 30 s
            return TransientVendorError(picked.name, "ReadTimeout after sending", ambiguous=True)

        picked.default = frozen  # type: ignore[assignment]
        await rig.handle(job)
        doc = await rig.doc(mail_id)
        assert rig.registry.is_available(picked.name)
        assert await vendor_mark(rig.store, picked.name) is None
    assert doc["attempts"][0]["outcome"] == "unknown" and "stood still" in doc["attempts"][0]["error"]
    assert doc["status"] == "sent"  # the claim still stood (fenced), so it failed over


async def test_a_claim_taken_over_meanwhile_sends_nothing_more(settings: Settings) -> None:
    [mail_id] = await produce(settings, 1)
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        job = await rig.reserve()
        picked = rig.picked(job)
        store = rig.store

        async def taken_over(email: object, mail_id: str) -> None:
            await store.mails.update_one(
                {"_id": ObjectId(mail_id)},
                {"$set": {"consumer": "other:2:y", "claim": "theirs", "lease_until": time.time() + 600}},
            )

        def timed_out(email: object, mail_id: str) -> TransientVendorError:
            return TransientVendorError(picked.name, "ReadTimeout after sending", ambiguous=True)

        picked.default = timed_out  # type: ignore[assignment]
        claim_one = store.claim_one

        async def claim_then_take_over(*args: Any, **kwargs: Any) -> Any:
            result = await claim_one(*args, **kwargs)
            await taken_over(None, mail_id)
            return result

        store.claim_one = claim_then_take_over  # type: ignore[method-assign]
        settle = await rig.handle(job)
        doc = await rig.doc(mail_id)
    assert settle.action is Action.RELEASE and settle.reason == "claim lost"
    others = [v for v in vendors if v is not picked]
    assert sum(len(v.sends) for v in others) == 0  # no failover send under a lost claim
    assert doc["claim"] == "theirs" and doc["status"] == "sending"  # their claim stands


def test_backoff_jitter_spreads_retries_below_the_plain_delay() -> None:
    delays = {backoff_delay(3, 30, 3600, jitter=j / 10) for j in range(10)}
    assert len(delays) == 10 and max(delays) == 120 and min(delays) >= 0.8 * 120


async def test_the_job_of_a_cancelled_mail_is_deleted_unsent(settings: Settings) -> None:
    [mail_id] = await produce(settings, 1)
    async with MailStore(settings) as store:
        await store.mails.update_one({"_id": ObjectId(mail_id)}, {"$set": {"status": "cancelled"}})
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        job, settle = await rig.step()
        doc = await rig.doc(mail_id)
    assert settle.action is Action.DELETE and settle.reason == "already finished"
    assert await job_stats(settings, job.id) is None
    assert sum(len(v.sends) for v in vendors) == 0 and doc["status"] == "cancelled"


# --- throttling and send-rate limits ---------------------------------------------------------


async def test_a_throttled_vendor_is_paused_briefly_and_the_mail_fails_over(settings: Settings) -> None:
    from mailer.errors import VendorThrottled

    settings = with_consumer(settings, vendor_cooldown_s=COOLDOWN)
    [mail_id] = await produce(settings, 1)
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        job = await rig.reserve()
        picked = rig.picked(job)
        picked.default = VendorThrottled(picked.name, "429 slow down", retry_after=2.0)
        await rig.handle(job)
        doc = await rig.doc(mail_id)
        until, reason = rig.registry.snapshot()[picked.name]
    assert doc["status"] == "sent" and doc["vendor"] == next_of(picked.name)
    assert 0 < until - time.time() <= 2.5  # a pause of its Retry-After, not the 600 s cooldown
    assert "throttl" in reason.lower()


async def test_when_every_vendor_throttles_the_mail_waits_without_losing_a_round(settings: Settings) -> None:
    from mailer.errors import VendorThrottled

    [mail_id] = await produce(settings, 1)
    vendors = fake_vendors()
    for v in vendors:
        v.default = VendorThrottled(v.name, "429", retry_after=3.0)
    async with delivery_rig(settings, vendors) as rig:
        _, settle = await rig.step()
        doc = await rig.doc(mail_id)
    assert settle.action is Action.RELEASE and settle.reason == "not counted" and 1 <= settle.delay <= 4
    assert doc["status"] == "retrying" and doc.get("rounds", 0) == 0


async def test_mails_past_a_vendors_waiting_room_are_put_off_not_failed_over(settings: Settings) -> None:
    from mailer.delivery import PACE_WAIT_S
    from mailer.ratelimit import RateLimiter

    ids = await produce(settings, 1)
    vendors = fake_vendors()
    async with delivery_rig(settings, vendors) as rig:
        job = await rig.reserve()
        picked = rig.picked(job)
        limiter = RateLimiter({picked.name: 1.0})
        rig.consumer.delivery.limiter = limiter
        while limiter.try_acquire(picked.name):  # spend what the first window holds
            pass
        rig.consumer.delivery._pace_waiting[picked.name] = int(PACE_WAIT_S)  # the room is full
        settle = await rig.handle(job)
        doc = await rig.doc(ids[0])
    assert settle.action is Action.RELEASE and settle.reason == "not counted"
    assert settle.delay >= PACE_WAIT_S  # its turn, after the waiting room's
    assert sum(len(v.sends) for v in vendors) == 0  # not sent elsewhere meanwhile
    assert doc["status"] == "retrying" and doc.get("rounds", 0) == 0
