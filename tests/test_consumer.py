"""The consumer process against the real beanstalkd and nx-27017: in-process consumers with
FakeVendors for exact routing checks, and ``python -m mailer.consumer --test`` subprocesses
(simulated vendors) for the shared circuit breaker, signals and crashes."""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import time
from pathlib import Path
from typing import cast

import pytest
from bson import ObjectId
from helpers import (
    VENDOR_NAMES,
    ConsumerProcess,
    FakeClock,
    MakeSettings,
    docs,
    fake_vendors,
    job_stats,
    produce,
    put_bodies,
    running_consumer,
    tube_counts,
    tube_empty,
    vendor_mark,
    wait_all_status,
    wait_until,
    with_beanstalkd,
    with_consumer,
)

from mailer.beanstalk import Job
from mailer.claims import Held
from mailer.config import Settings
from mailer.consumer import Prefetch, Prefetched, main
from mailer.delivery import Action, Decision, Delivery, Ready
from mailer.errors import StoreUnavailable, TransientVendorError
from mailer.jobs import OwnedJob
from mailer.models import Email
from mailer.store import Doc, MailStore

COOLDOWN = 600.0


def sent_attempts(doc: Doc) -> list[Doc]:
    return [a for a in doc["attempts"] if a["outcome"] == "sent"]


# --- end to end --------------------------------------------------------------------------


@pytest.mark.slow
async def test_1000_mails_at_concurrency_50_are_all_sent(settings: Settings) -> None:
    vendors = fake_vendors()
    ids = await produce(settings, 1000)
    async with running_consumer(settings, vendors, concurrency=50) as consumer, MailStore(settings) as store:
        found = await wait_all_status(store, ids, "sent", within=30)
        await wait_until(lambda: tube_empty(settings), within=10, what="an empty tube")
        assert consumer.processed == 1000
    assert sum(len(v.sends) for v in vendors) == 1000
    assert sorted(i for v in vendors for i in v.delivered) == sorted(ids)
    for doc in found.values():
        attempts = doc["attempts"]
        assert isinstance(attempts, list) and len(attempts) == 1
        [attempt] = attempts
        assert isinstance(attempt, dict)
        assert attempt["vendor"] == doc["vendor"] and attempt["outcome"] == "sent"
        assert attempt["message_id"] == doc["message_id"]
        assert doc["lease_until"] == 0.0
    assert await tube_counts(settings) == dict.fromkeys(("ready", "reserved", "delayed", "buried"), 0)


async def test_round_robin_spreads_exactly_by_job_id(settings: Settings) -> None:
    vendors = fake_vendors()
    ids = await produce(settings, 400)
    async with running_consumer(settings, vendors, concurrency=20), MailStore(settings) as store:
        found = await wait_all_status(store, ids, "sent")
    for doc in found.values():
        assert doc["vendor"] == VENDOR_NAMES[doc["job_id"] % 4], doc
        assert doc["attempts"][0]["job_id"] == doc["job_id"]
    spread = collections.Counter(d["vendor"] for d in found.values())
    assert spread == collections.Counter(VENDOR_NAMES[d["job_id"] % 4] for d in found.values())
    job_ids = sorted(d["job_id"] for d in found.values())
    if job_ids == list(range(job_ids[0], job_ids[0] + 400)):  # no other client put meanwhile
        assert spread == dict.fromkeys(VENDOR_NAMES, 100)
    assert {v.name: len(v.sends) for v in vendors} == dict(spread)


# --- failover and the shared circuit breaker -----------------------------------------------


@pytest.mark.slow
async def test_failover_is_shared_with_a_second_process_then_half_open_probe_closes_it(
    settings: Settings, tmp_path: Path
) -> None:
    clock = FakeClock()
    vendors = fake_vendors(mailgun={"default": TransientVendorError("mailgun", "503 service unavailable")})
    mailgun = vendors[1]
    async with MailStore(settings) as store:
        # 1. one consumer finds mailgun down: its mails go out through the next vendor
        first = await produce(settings, 20)
        async with running_consumer(settings, vendors, concurrency=4, clock=clock):
            found = await wait_all_status(store, first, "sent")
        assert len(mailgun.sends) == 1  # later jobs skipped it
        hit = [d for d in found.values() if d["attempts"][0]["vendor"] == "mailgun"]
        assert len(hit) == 1
        assert [(a["vendor"], a["outcome"]) for a in hit[0]["attempts"]] == [
            ("mailgun", "transient"),
            ("sendinblue", "sent"),
        ]
        mark = await vendor_mark(store, "mailgun")
        assert mark is not None and mark["until"] == pytest.approx(clock() + COOLDOWN)

        # 2. another process (simulated vendors of the same names) skips it too
        proc = ConsumerProcess(settings, tmp_path, concurrency=4)
        try:
            await proc.wait_started()
            second = await produce(settings, 30, start=100)
            found = await wait_all_status(store, second, "sent")
            assert await proc.stop() == 0
        finally:
            proc.kill()
        up = ["amazon", "sendinblue", "sparkpost"]
        for doc in found.values():
            assert [a["vendor"] for a in doc["attempts"]] == [doc["vendor"]]
            assert doc["vendor"] == up[doc["job_id"] % 3]
            assert f":{proc.pid}:" in doc["attempts"][0]["consumer"]
            assert doc["message_id"].startswith(f"sim-{doc['vendor']}-{proc.pid}-")
        assert len(mailgun.sends) == 1

        # 3. past the cooldown (injected clock, no sleeping) mailgun is probed with one send;
        #    it works now, so the breaker closes for everyone
        mailgun.default = None
        clock.advance(COOLDOWN + 1)
        third = await produce(settings, 12, start=200)
        async with running_consumer(settings, vendors, concurrency=1, clock=clock) as consumer:
            found = await wait_all_status(store, third, "sent")

            async def cleared() -> bool:
                m = await vendor_mark(store, "mailgun")
                return m is not None and m["until"] == 0.0

            await wait_until(cleared, what="the mailgun mark to be cleared in MongoDB")
            assert consumer.registry.snapshot()["mailgun"] == (0.0, "")
        probe = mailgun.sends[1]
        assert probe.ok and probe.mail_id in third
        # closed again: plain round robin over all four
        assert all(d["vendor"] == VENDOR_NAMES[d["job_id"] % 4] for d in found.values())


async def test_failed_half_open_probe_opens_the_breaker_for_another_cooldown(settings: Settings) -> None:
    clock = FakeClock()
    vendors = fake_vendors(mailgun={"default": TransientVendorError("mailgun", "503 service unavailable")})
    mailgun = vendors[1]
    async with MailStore(settings) as store, running_consumer(settings, vendors, clock=clock) as consumer:
        first = await produce(settings, 12)
        await wait_all_status(store, first, "sent")
        assert len(mailgun.sends) == 1
        marked_until = consumer.registry.snapshot()["mailgun"][0]

        clock.advance(COOLDOWN + 1)
        second = await produce(settings, 12, start=100)
        found = await wait_all_status(store, second, "sent")
        assert len(mailgun.sends) == 2  # exactly one probe, which failed
        probed = next(d for d in found.values() if d["attempts"][0]["vendor"] == "mailgun")
        assert [a["outcome"] for a in probed["attempts"]] == ["transient", "sent"]
        assert probed["vendor"] == "sendinblue"

        async def reopened() -> bool:
            m = await vendor_mark(store, "mailgun")
            return m is not None and m["until"] == pytest.approx(clock() + COOLDOWN)

        await wait_until(reopened, what="the mark to be renewed for another cooldown")
        assert consumer.registry.snapshot()["mailgun"][0] > marked_until
        assert all(d["vendor"] != "mailgun" for d in found.values())


async def test_a_late_success_of_an_earlier_send_does_not_reopen_a_marked_vendor(settings: Settings) -> None:
    # Sends take 0.1 s and 8 run at once: when mailgun's first send fails, others to it are
    # still in flight and succeed afterwards; they began before the mark and must not lift it.
    clock = FakeClock()
    vendors = fake_vendors(**{n: {"latency_s": 0.1} for n in VENDOR_NAMES})
    mailgun = vendors[1]
    mailgun.script.append(TransientVendorError("mailgun", "503 service unavailable"))
    ids = await produce(settings, 40)
    async with (
        MailStore(settings) as store,
        running_consumer(settings, vendors, concurrency=8, clock=clock) as consumer,
    ):
        found = await wait_all_status(store, ids, "sent")
        assert not consumer.registry.is_available("mailgun")
        mark = await vendor_mark(store, "mailgun")
        assert mark is not None and mark["until"] == pytest.approx(clock() + COOLDOWN)
    assert len(mailgun.sends) <= 8  # only those begun before the mark
    [failed] = [d["attempts"][0] for d in found.values() if d["attempts"][0]["outcome"] != "sent"]
    late = [d for d in found.values() if d["vendor"] == "mailgun"]
    assert all(d["attempts"][0]["started_at"] <= failed["finished_at"] for d in late)


# --- poison, redelivery -------------------------------------------------------------------


async def test_poison_jobs_are_buried_and_the_consumer_keeps_going(settings: Settings) -> None:
    corrupted = ObjectId()
    async with MailStore(settings) as store:
        await store.mails.insert_one(
            {"_id": corrupted, "status": "queued", "rounds": 0, "attempts": [], "mail": {"to": 5}}
        )
        poison = await put_bodies(settings, b"hello", str(ObjectId()).encode(), str(corrupted).encode())
        ids = await produce(settings, 20)
        vendors = fake_vendors()
        async with running_consumer(settings, vendors, concurrency=4):
            await wait_all_status(store, ids, "sent")
            await wait_until(
                lambda: _buried(settings, len(poison)), within=10, what=f"{len(poison)} buried jobs"
            )
        doc = await store.mails.find_one({"_id": corrupted})
    assert doc is not None and doc["status"] == "failed"
    assert "corrupted" in doc["error"]
    for job_id in poison:
        stats = await job_stats(settings, job_id)
        assert stats is not None and stats["state"] == "buried" and stats["buries"] == 1
    assert sum(len(v.sends) for v in vendors) == 20


async def _count(store: MailStore, status: str) -> int:
    return await store.mails.count_documents({"status": {"$eq": status}})


async def _buried(settings: Settings, n: int) -> bool:
    counts = await tube_counts(settings)
    return counts["buried"] == n and counts["ready"] == counts["reserved"] == 0


async def test_redelivered_and_twin_jobs_send_nothing(settings: Settings) -> None:
    ids = await produce(settings, 4)
    vendors = fake_vendors()
    async with MailStore(settings) as store, running_consumer(settings, vendors) as consumer:
        await wait_all_status(store, ids, "sent")
        before = await docs(store, ids)
        # a redelivery of every sent mail, and a twin of a mail another consumer is sending
        [twin] = await produce(settings, 1, start=50)
        await wait_all_status(store, [twin], "sent")
        await store.mails.update_one(
            {"_id": ObjectId(twin)},
            {"$set": {"status": "sending", "consumer": "other:1:x", "lease_until": time.time() + 600}},
        )
        await put_bodies(settings, *(i.encode() for i in [*ids, twin]))
        await wait_until(lambda: consumer.processed == 10, what="the 5 extra jobs handled")
        await wait_until(lambda: tube_empty(settings), what="the extra jobs deleted")
        after = await docs(store, ids)
        twin_doc = await store.mails.find_one({"_id": ObjectId(twin)})
    assert sum(len(v.sends) for v in vendors) == 5
    assert after == before
    assert twin_doc is not None and twin_doc["status"] == "sending" and twin_doc["consumer"] == "other:1:x"


# --- shutdown -------------------------------------------------------------------------------


async def test_stop_lets_in_flight_deliveries_finish_within_the_grace_period(settings: Settings) -> None:
    vendors = fake_vendors()
    for v in vendors:
        v.hang.clear()  # sends block until the test lets them go
    ids = await produce(settings, 40)
    async with MailStore(settings) as store:
        async with running_consumer(settings, vendors, concurrency=8) as consumer:
            # 8 sends, and behind each the next mail already claimed (prefetched).
            await wait_until(lambda: len(consumer._inflight) == 16, what="8 sends and 8 prefetched")
            in_flight = {item.job.body.decode() for item in consumer._inflight.values()}
            consumer.stop()  # no new jobs from here on ...
            for v in vendors:
                v.hang.set()  # ... while the 8 in flight finish
        final = await docs(store, ids)
    statuses = collections.Counter(d["status"] for d in final.values())
    assert statuses == {"sent": 8, "queued": 32}
    assert {i for i, d in final.items() if d["status"] == "sent"} <= in_flight
    assert sum(len(v.sends) for v in vendors) == 8  # the prefetched mails were handed back unsent
    counts = await tube_counts(settings)
    assert counts == {"ready": 32, "reserved": 0, "delayed": 0, "buried": 0}


async def test_sends_longer_than_the_grace_period_finish_and_are_not_sent_twice(settings: Settings) -> None:
    settings = with_consumer(settings, grace_s=0.2)
    vendors = fake_vendors(**{n: {"latency_s": 1.0, "timeout_s": 5.0} for n in VENDOR_NAMES})
    ids = await produce(settings, 4)
    async with MailStore(settings) as store:
        async with running_consumer(settings, vendors, concurrency=4) as consumer:
            await wait_until(lambda: consumer.delivery.sending() == 4, what="4 sends at their vendors")
        final = await docs(store, ids)
        assert {d["status"] for d in final.values()} == {"sent"}  # the stop waited for them
        async with running_consumer(settings, vendors, concurrency=4):
            await asyncio.sleep(0.5)
    assert sum(len(v.sends) for v in vendors) == 4
    assert await tube_counts(settings) == {"ready": 0, "reserved": 0, "delayed": 0, "buried": 0}


async def test_sends_outlasting_their_timeout_at_stop_are_handed_back_as_unknown(
    settings: Settings,
) -> None:
    settings = with_consumer(settings, grace_s=0.3)
    vendors = fake_vendors(**{n: {"timeout_s": 0.3} for n in VENDOR_NAMES})
    for v in vendors:
        v.hang.clear()  # every send blocks, past its (fake) timeout
    ids = await produce(settings, 6)
    async with MailStore(settings) as store:
        async with running_consumer(settings, vendors, concurrency=4) as consumer:
            await wait_until(lambda: len(consumer._inflight) == 6, what="4 sends and 2 prefetched")
        found = await docs(store, ids)
        statuses = collections.Counter(d["status"] for d in found.values())
        # the 4 cut off while their vendor had them are recorded, the 2 prefetched just released
        assert statuses == {"retrying": 4, "queued": 2}
        for d in found.values():
            if d["status"] == "retrying":
                assert [a["outcome"] for a in d["attempts"]] == ["unknown"]
                assert "may have been delivered" in d["error"]
        counts = await tube_counts(settings)
        assert counts["ready"] == 6 and counts["delayed"] == counts["reserved"] == 0
        # a new consumer delivers all of them
        for v in vendors:
            v.hang.set()
        async with running_consumer(settings, vendors, concurrency=4):
            await wait_all_status(store, ids, "sent")


# --- the process: CLI, signals, crashes ----------------------------------------------------


def test_cli_refuses_a_concurrency_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--concurrency", "0", "--test"]) == 2
    err = capsys.readouterr().err
    assert "--concurrency" in err and "at least 1" in err


async def test_throughput_lines_are_printed(settings: Settings, tmp_path: Path) -> None:
    proc = ConsumerProcess(
        settings, tmp_path, concurrency=4, MAILER_MEASURE_THROUGHPUT="true", MAILER_THROUGHPUT_INTERVAL_S=0.2
    )
    try:
        await proc.wait_started()
        ids = await produce(settings, 50)
        async with MailStore(settings) as store:
            await wait_all_status(store, ids, "sent")
        pattern = re.compile(rf"^Consumer PID:{proc.pid} Throughput: [\d.]+ ops / second$", re.M)
        await wait_until(lambda: len(pattern.findall(proc.stdout())) >= 2, within=10, what="2 lines")
        assert any(float(r) > 0 for r in re.findall(r"Throughput: ([\d.]+)", proc.stdout()))
        assert await proc.stop() == 0
    finally:
        proc.kill()


async def test_a_second_sigint_exits_at_once(settings: Settings, tmp_path: Path) -> None:
    # sends take 60 s and the grace period is 60 s: only the second signal ends it quickly
    proc = ConsumerProcess(
        settings,
        tmp_path,
        concurrency=2,
        MAILER_SIMULATION__LATENCY_MS=60_000,
        MAILER_CONSUMER__GRACE_S=60,
    )
    try:
        await proc.wait_started()
        ids = await produce(settings, 2)
        async with MailStore(settings) as store:
            await wait_all_status(store, ids, "sending", within=10)
        proc.signal(signal.SIGINT)
        await wait_until(lambda: "SIGINT received" in proc.stderr(), within=10, what="the first SIGINT")
        started = time.monotonic()
        proc.signal(signal.SIGINT)
        assert await proc.wait(within=5) == 130
        assert time.monotonic() - started < 5
        assert "second signal" in proc.stderr()
    finally:
        proc.kill()


@pytest.mark.slow
async def test_sigterm_during_deliveries_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    ids = await produce(settings, 300)
    first = ConsumerProcess(
        settings, tmp_path, concurrency=20, MAILER_SIMULATION__LATENCY_MS=300, MAILER_CONSUMER__GRACE_S=10
    )
    async with MailStore(settings) as store:
        try:
            await first.wait_started()

            async def some_sent() -> bool:
                return await store.mails.count_documents({"status": "sent"}) >= 60

            await wait_until(some_sent, what="60 mails sent", interval=0.05)
            assert await store.mails.count_documents({"status": "sending"}) > 0  # mid-run
            first.signal(signal.SIGTERM)
            started = time.monotonic()
            assert await first.wait(within=15) == 0
            assert time.monotonic() - started < 10
        finally:
            first.kill()
        assert "Traceback" not in first.stderr()
        found = await docs(store, ids)
        statuses = collections.Counter(d["status"] for d in found.values())
        assert statuses["sending"] == 0
        assert set(statuses) <= {"sent", "queued", "retrying"}
        assert 60 <= statuses["sent"] < 300
        counts = await tube_counts(settings)
        # every unsent mail still has its job on the tube
        assert counts["ready"] + counts["delayed"] == 300 - statuses["sent"]
        assert counts["reserved"] == counts["buried"] == 0

        second = ConsumerProcess(settings, tmp_path, concurrency=20)
        try:
            await second.wait_started()
            found = await wait_all_status(store, ids, "sent")
            assert await second.stop() == 0
        finally:
            second.kill()
    assert all(len(sent_attempts(d)) == 1 for d in found.values())  # none sent twice
    assert await tube_empty(settings)


@pytest.mark.slow
async def test_sigkill_mid_send_its_jobs_are_delivered_by_another_consumer_after_ttr(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    settings = with_beanstalkd(await make_settings(), ttr_s=2)
    ids = await produce(settings, 40)
    async with MailStore(settings) as store:
        doomed = ConsumerProcess(settings, tmp_path, concurrency=10, MAILER_SIMULATION__LATENCY_MS=1500)
        try:
            await doomed.wait_started()

            async def mid_send() -> list[Doc]:
                found = await docs(store, ids)
                return [d for d in found.values() if d["status"] == "sending"]

            in_flight = await wait_until(mid_send, what="deliveries in flight")
            doomed.proc.kill()
            assert await doomed.wait(within=10) == -signal.SIGKILL
        finally:
            doomed.kill()
        assert all(d["consumer"].split(":")[1] == str(doomed.pid) for d in in_flight)
        orphaned = [str(d["_id"]) for d in (await mid_send())]
        assert orphaned, "the killed consumer left mails in 'sending'"

        # beanstalkd hands its jobs back as soon as its connections drop (at the latest
        # after TTR); its claims on the documents run out with the TTR ...
        async def handed_back() -> bool:
            counts = await tube_counts(settings)
            return counts["reserved"] == 0 and counts["ready"] == 40 - (await _count(store, "sent"))

        await wait_until(handed_back, within=5, what="the killed consumer's jobs ready again")
        # ... and then the next consumer takes them over
        lease_end = max(d["lease_until"] for d in (await docs(store, orphaned)).values())
        await wait_until(lambda: time.time() > lease_end, within=10, what="the lease to run out")
        rescuer = ConsumerProcess(settings, tmp_path, concurrency=10)
        try:
            await rescuer.wait_started()
            found = await wait_all_status(store, ids, "sent")
            assert await rescuer.stop() == 0
        finally:
            rescuer.kill()
    for mail_id in orphaned:
        [attempt] = sent_attempts(found[mail_id])
        assert f":{rescuer.pid}:" in attempt["consumer"]
    assert all(len(sent_attempts(d)) == 1 for d in found.values())
    assert await tube_empty(settings)


@pytest.mark.slow
async def test_sigkill_while_another_consumer_runs_loses_nothing(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    """The realistic case: a second consumer is already running when the first dies. The
    dead one's jobs are ready again at once (its connections closed) while its claims on the
    documents are still leased; the survivor must neither send them twice nor drop them."""
    settings = with_beanstalkd(await make_settings(), ttr_s=2)
    ids = await produce(settings, 40)
    async with MailStore(settings) as store:
        doomed = ConsumerProcess(settings, tmp_path, concurrency=10, MAILER_SIMULATION__LATENCY_MS=1500)
        survivor = ConsumerProcess(
            settings,
            tmp_path,
            concurrency=2,
            MAILER_SIMULATION__LATENCY_MS=200,
        )
        try:
            await doomed.wait_started()
            await survivor.wait_started()

            async def doomed_sending() -> bool:
                return (
                    await store.mails.count_documents(
                        {"status": "sending", "consumer": {"$regex": f":{doomed.pid}:"}}
                    )
                    > 0
                )

            await wait_until(doomed_sending, what="the first consumer mid-send")
            doomed.proc.kill()
            assert await doomed.wait(within=10) == -signal.SIGKILL
            found = await wait_all_status(store, ids, "sent", within=45)
            assert await survivor.stop() == 0
        finally:
            doomed.kill()
            survivor.kill()
    assert all(len(sent_attempts(d)) == 1 for d in found.values())


@pytest.mark.slow
async def test_a_send_longer_than_the_ttr_is_kept_alive_and_not_redelivered(
    make_settings: MakeSettings,
) -> None:
    settings = with_beanstalkd(await make_settings(), ttr_s=2)
    slow = fake_vendors(**{n: {"latency_s": 4.0} for n in VENDOR_NAMES})
    other = fake_vendors()
    [mail_id] = await produce(settings, 1)
    async with MailStore(settings) as store, running_consumer(settings, slow, concurrency=1) as first:
        await wait_until(lambda: len(first._inflight) == 1, what="the slow send to start")
        async with running_consumer(settings, other, concurrency=2):
            await wait_all_status(store, [mail_id], "sent", within=15)
    assert sum(len(v.sends) for v in slow) == 1
    assert sum(len(v.sends) for v in other) == 0
    assert await tube_empty(settings)


# --- start-up: MongoDB not there yet --------------------------------------------------------


async def test_the_consumer_waits_for_mongodb_at_start_and_says_so_once(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from faults.harness import Mongo
    from pydantic import SecretStr

    from mailer.consumer import Consumer

    mongo = Mongo(tmp_path / "late-mongo")
    away = settings.model_copy(
        update={
            "mongodb": settings.mongodb.model_copy(update={"uri": SecretStr(mongo.uri), "timeout_ms": 200})
        }
    )
    consumer = Consumer(away, concurrency=1, vendors=fake_vendors())
    connecting = asyncio.create_task(consumer.connect())
    try:
        await asyncio.sleep(2.0)  # several retries
        assert not connecting.done(), "the consumer gave up instead of waiting for MongoDB"
        await mongo.start()
        await asyncio.wait_for(connecting, 40)
        waits = [r for r in caplog.records if "waiting for it" in r.getMessage()]
        assert len(waits) == 1 and "cannot reach MongoDB" in waits[0].getMessage()
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        connecting.cancel()
        await consumer.close()
        mongo.kill()


async def test_mails_waiting_for_a_rate_limit_do_not_hold_the_other_vendors(settings: Settings) -> None:
    limited = VENDOR_NAMES[1]
    settings = settings.model_copy(
        update={"simulation": settings.simulation.model_copy(update={"max_per_second": {limited: 2.0}})}
    )
    vendors = fake_vendors()
    ids = await produce(settings, 40)
    async with MailStore(settings) as store, running_consumer(settings, vendors, concurrency=4):
        others = [v for v in vendors if v.name != limited]
        await wait_until(
            lambda: sum(len(v.sends) for v in others) == 30, within=5, what="the other vendors' 30 mails"
        )
        slow = next(v for v in vendors if v.name == limited)
        assert len(slow.sends) <= 8  # 2/s: it is still working through its 10
        await wait_all_status(store, ids, "sent", within=20)
    assert len(slow.sends) == 10


# --- a loop's run of sends (Prefetch), against a scripted delivery ---------------------------


class ScriptedDelivery:
    """Stands in for :class:`mailer.delivery.Delivery` in a :class:`Prefetch`: each send
    waits until the test ends it, and the test sees which sends began and which were cut."""

    def __init__(self) -> None:
        self.began: list[int] = []
        self.cancelled: list[int] = []
        self.ends: dict[int, asyncio.Future[Decision]] = {}

    async def deliver(self, ready: Ready) -> Decision:
        self.began.append(ready.job.id)
        end = self.ends[ready.job.id] = asyncio.get_running_loop().create_future()
        try:
            return await end
        except asyncio.CancelledError:
            self.cancelled.append(ready.job.id)
            raise

    def end(self, job_id: int, *, recorded: bool = True) -> None:
        recording = asyncio.get_running_loop().create_future() if recorded else None
        self.ends[job_id].set_result(Decision(Action.DELETE, reason="sent", recording=recording))


def _item(job_id: int) -> Prefetched:
    email = Email.model_validate(
        {"from": "a@example.com", "to": ["b@example.com"], "subject": "s", "text": "t"}
    )
    oid = ObjectId()
    held = Held(oid=oid, job_id=job_id, token="t", priority=1024, claimed_at=0.0)
    ready = Ready(Job(job_id, str(oid).encode()), oid, {}, email, held)
    return Prefetched(cast(OwnedJob, None), ready)


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _first_sending(
    delivery: ScriptedDelivery, go_on: list[bool] | None = None
) -> tuple[Prefetch, Prefetched, Prefetched, asyncio.Future[Decision]]:
    """A loop's slot with mail 1 at its vendor and mail 2 claimed in the slot."""
    flag = go_on if go_on is not None else [True]
    ahead = Prefetch(cast(Delivery, delivery), lambda: flag[0])
    first, second = _item(1), _item(2)
    outcome = ahead.send(first)
    await _turns()
    ahead.fill(second)
    return ahead, first, second, outcome


async def test_the_next_send_begins_as_the_previous_one_returns() -> None:
    """With its record under way, a send's return begins the slot's mail in the same task:
    by the time anyone waiting for the first outcome runs, the second is with its vendor."""
    delivery = ScriptedDelivery()
    _, _, second, outcome = await _first_sending(delivery)
    delivery.end(1)
    decision = await outcome
    assert decision.reason == "sent"
    assert delivery.began == [1, 2]
    assert second.sending is not None and not second.sending.done()
    delivery.end(2)
    assert (await second.sending).reason == "sent"


@pytest.mark.parametrize("why", ["no record", "stopping", "on its own", "not claimed"])
async def test_the_run_of_sends_stops_where_the_loop_must_decide(why: str) -> None:
    """Nothing follows a send that recorded nothing, a send after stop, a mail its loop left
    (parked, or detached after an error), or a slot mail that is not ready to send."""
    delivery, go_on = ScriptedDelivery(), [True]
    ahead, first, second, outcome = await _first_sending(delivery, go_on)
    if why == "not claimed":
        second.prepared = Decision(Action.RELEASE, delay=1, reason="claim did not take")
    if why == "stopping":
        go_on[0] = False
    if why == "on its own":
        first.on_its_own = True
    delivery.end(1, recorded=why != "no record")
    await outcome
    await _turns()
    assert delivery.began == [1]
    assert second.sending is None
    if why != "not claimed":  # the loop may still begin it itself
        ahead.start()
        await _turns()
        assert delivery.began == [1, 2]


async def test_giving_up_on_an_outcome_cuts_its_send_and_ends_the_run() -> None:
    """A loop cancelled at shutdown, or a parked mail's task, cancels the outcome it waits
    for: that send is cut at once (so delivery records it as interrupted) as a task of its
    own would be, and the slot's mail is not begun."""
    delivery = ScriptedDelivery()
    _, first, second, outcome = await _first_sending(delivery)

    async def waiter() -> Decision:
        return await outcome

    task = asyncio.ensure_future(waiter())
    await _turns()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # At once: a stopping consumer hands the job back as soon as its loop has ended, and by
    # then the send must know it was cut (a turn later it could still record a send).
    assert delivery.cancelled == [1]
    await _turns()
    assert first.sending is not None and first.sending.cancelled()
    assert second.sending is None and delivery.began == [1]


async def test_a_send_that_raises_fails_only_its_own_outcome() -> None:
    delivery = ScriptedDelivery()
    _, _, second, outcome = await _first_sending(delivery)
    delivery.ends[1].set_exception(StoreUnavailable("MongoDB is away"))
    with pytest.raises(StoreUnavailable):
        await outcome
    await _turns()
    assert second.sending is None and delivery.began == [1]
