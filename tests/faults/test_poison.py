"""Poison jobs: bodies that are not mail ids, ids of deleted mails, mails whose stored
message is corrupted, mails whose status is none mailer writes. Each job is buried (and a
corrupted message's mail failed with a reason); the consumer keeps going and delivers the
good mails around them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bson import ObjectId

from mailer.beanstalk import Beanstalk
from mailer.store import MailStore

from .harness import (
    ConsumerProcess,
    Feeder,
    Processes,
    ScenarioSettings,
    assert_clean,
    record,
    tally,
    total_sends,
    tube_counts,
    wait_settled,
    wait_until,
)

GOOD = 200

NOT_IDS = [
    b"",
    b"hello",
    b"\xff\xfe\x00binary",
    b"zzzzzzzzzzzzzzzzzzzzzzzz",  # 24 characters, not hex
    b"6b09e4ac7dc1c5ec444ad48",  # 23 hex digits
    b"6b09e4ac7dc1c5ec444ad48c0",  # 25 hex digits
    b'{"mail_id": "6b09e4ac7dc1c5ec444ad48c"}',
    b"x" * 4000,
    "ünïcödé-ünïcödé-ünïcödé".encode(),
]

# Shape, not content: stored mails are trusted to have passed validation once (addresses are
# not re-checked on delivery), so only corruptions of their shape can be told from a mail.
CORRUPTIONS = [
    {"$set": {"mail.to": [42]}},
    {"$set": {"mail.subject": 12345}},
    {"$set": {"mail": "a string instead of a mail"}},
    {"$unset": {"mail": ""}},
    {"$set": {"mail.from": None}},
    {"$set": {"mail.headers": {"Bcc": "smuggled@example.com"}}},
]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_poison_jobs_are_buried_and_the_consumer_goes_on(
    make_scenario: ScenarioSettings, procs: Processes, tmp_path: Path
) -> None:
    settings = make_scenario("poison", ttr_s=10, simulation={"latency_ms": 5})
    b = settings.beanstalkd
    began = time.monotonic()
    async with MailStore(settings) as store:
        good = Feeder(settings, "good")
        await good.run(GOOD // 2, batch=50)
        # Mails deleted from MongoDB after they were queued (by hand, by a TTL, by a bug).
        doomed = Feeder(settings, "gone")
        await doomed.run(5, batch=5)
        for mail_id in doomed.accepted:
            assert await store.delete(mail_id)
        # Mails whose status is none that mailer writes.
        odd = Feeder(settings, "odd")
        await odd.run(3, batch=3)
        await store.mails.update_one({"_id": ObjectId(odd.accepted[0])}, {"$unset": {"status": ""}})
        await store.mails.update_one({"_id": ObjectId(odd.accepted[1])}, {"$set": {"status": "bogus"}})
        # ... and one no check foresees (an error nobody expected: the consumer's safety net).
        await store.mails.update_one(
            {"_id": ObjectId(odd.accepted[2])}, {"$set": {"status": "sending", "lease_until": "soon"}}
        )
        # Mails whose stored message no longer parses.
        broken = Feeder(settings, "broken")
        await broken.run(len(CORRUPTIONS), batch=len(CORRUPTIONS))
        for mail_id, change in zip(broken.accepted, CORRUPTIONS, strict=True):
            result = await store.mails.update_one({"_id": ObjectId(mail_id)}, change)
            assert result.modified_count == 1, change
        async with Beanstalk(b.host, b.port) as bs:
            await bs.use(b.tube)
            for body in NOT_IDS:
                await bs.put(body, ttr=b.ttr_s)
            await bs.put(str(ObjectId()).encode(), ttr=b.ttr_s)  # an id never stored at all
        await good.run(GOOD // 2, start=GOOD // 2, batch=50)
        poison = len(NOT_IDS) + 1 + len(doomed.accepted) + len(odd.accepted) + len(broken.accepted)

        consumer = procs.add(ConsumerProcess(settings, tmp_path, concurrency=8))
        assert isinstance(consumer, ConsumerProcess)
        await consumer.start()
        accepted = good.accepted + broken.accepted
        settled = await wait_settled(store, len(accepted), within=60, what="(poison jobs)", ids=accepted)

        async def all_handled() -> dict[str, int] | None:
            counts = await tube_counts(settings)
            return counts if counts["ready"] + counts["reserved"] + counts["delayed"] == 0 else None

        counts = await wait_until(all_handled, within=30, what="every job handled")
        t = await tally(store, accepted, total_sends([consumer]))
        broken_docs = [await store.mails.find_one({"_id": ObjectId(i)}) for i in broken.accepted]
        # The consumer still works after all that: one more mail goes straight through.
        late = Feeder(settings, "late")
        await late.run(1)
        await wait_settled(store, 1, within=30, what="(a mail after the poison)", ids=late.accepted)
        late_sent = await store.mails.find_one({"_id": ObjectId(late.accepted[0])})
        log = consumer.output()
        record(
            "poison jobs",
            t,
            recover_s=settled - began,
            total_s=time.monotonic() - began,
            notes=(
                f"{len(NOT_IDS) + 1} non-id or never-stored bodies, {len(doomed.accepted)} deleted mails, "
                f"3 with a status or lease mailer never writes, {len(broken.accepted)} corrupted mails: "
                f"{counts['buried']} jobs buried, corrupted mails "
                f"failed with a reason; {GOOD} good mails sent around them"
            ),
        )
        assert consumer.alive, consumer.tail()
        assert await consumer.terminate() == 0, consumer.tail()
    assert counts["buried"] == poison, (counts, poison)
    for doc in broken_docs:
        assert doc is not None and doc["status"] == "failed", doc
        assert "corrupted" in doc["error"], doc["error"]
    assert late_sent is not None and late_sent["status"] == "sent"
    assert log.count("Traceback") == 1, log[-3000:]  # the unforeseen one, logged as a bug
    assert log.count("unexpected error on job") == 1 and "burying it" in log
    assert log.count("is not a mail id; burying it") == len(NOT_IDS)
    assert log.count("no stored mail") == len(doomed.accepted) + 1
    assert log.count("which mailer never writes; burying it") == 2
    assert_clean(t)
    assert t.sent_once == GOOD and t.failed == len(broken.accepted)
