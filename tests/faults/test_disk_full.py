"""Full disks: MongoDB's data disk, then beanstalkd's binlog disk, each a small tmpfs that a
filler file fills mid-run and that is freed a few seconds later."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailer.config import Settings
from mailer.store import MailStore

from .harness import (
    Beanstalkd,
    ConsumerProcess,
    Feeder,
    Mongo,
    Processes,
    ScenarioSettings,
    Tmpfs,
    assert_clean,
    hold_full,
    record,
    run_cli,
    scenario_settings,
    settled_within,
    tally,
    total_sends,
    tube_drained,
    wait_until,
)

MakeDisk = Callable[[Path, int], Tmpfs]
N_MONGO = 2000
MONGO_FULL_S = 6.0
# A single-loop consumer claims each mail alone (one find_one_and_update: nx-27017's silent
# no-match on a full disk is on that path); the last batches its loops' claims (update_many).
# Sends take 5 ms, so at the fill most loops are claiming, not waiting on a held record.
MONGO_CONSUMER_LOOPS = (1, 1, 1, 8)
N_BINLOG = 1000
BINLOG_FULL_S = 3.0
BINLOG_FILE_BYTES = 16384  # beanstalkd -s: a binlog file fills after ~80 puts, so puts fail soon
_SAID = re.compile(r"^.*(WARNING|ERROR|CRITICAL|mailer-consumer:).*$", re.MULTILINE)


@pytest.fixture
def small_disk() -> Iterator[MakeDisk]:
    """``small_disk(path, size_mb)``: a tmpfs on ``path``, unmounted afterwards (lazily if a
    server still holds it; list this fixture before ``procs`` so it is torn down after)."""
    disks: list[Tmpfs] = []

    def make(path: Path, size_mb: int) -> Tmpfs:
        if os.geteuid() != 0:
            pytest.skip("the full-disk scenarios mount a tmpfs (mount -t tmpfs), which needs root")
        disk = Tmpfs(path, size_mb)
        try:
            disk.mount()
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            pytest.skip(f"cannot mount a tmpfs on {path} ({exc} {detail.decode(errors='replace').strip()})")
        disks.append(disk)
        return disk

    yield make
    for disk in disks:
        disk.unmount()


async def boot_message(consumer: ConsumerProcess, *, within: float) -> tuple[str, bool]:
    """Start ``consumer`` and return what it says about its start (its warnings and errors,
    or its one-line exit message) and whether it is still running."""
    consumer.spawn()

    def spoke() -> bool:
        out = consumer.output()
        return not consumer.alive or bool(_SAID.search(out)) or " tube " in out

    await wait_until(spoke, within=within, interval=0.1, what=f"{consumer.name} to start or say why not")
    await asyncio.sleep(0.5)  # the rest of a multi-line message
    said = " | ".join(m.group(0).strip() for m in _SAID.finditer(consumer.output()))
    return said[:400], consumer.alive


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_mongodb_data_disk_full(
    small_disk: MakeDisk, make_scenario: ScenarioSettings, procs: Processes, tmp_path: Path
) -> None:
    """nx-27017's data directory is a 64 MB tmpfs, filled while four consumers deliver a
    backlog, kept full for 6 s, then freed. MongoDB refuses every write meanwhile: claims
    must fail loudly (the job kept for later), never be mistaken for a rival's claim (the
    job deleted as a twin, leaving its mail queued with no job). Recovery must come from the
    jobs alone: the consumers' sweep is off and `mailer requeue` is not run. TTR (and the
    lease) is 15 s, so a sent mail's record, retried for 80% of it, outlasts the full disk:
    no mail may go twice."""
    mongo_dir = tmp_path / "mongo"
    disk = small_disk(mongo_dir / "data", 64)
    mongo = Mongo(mongo_dir)
    procs.add(mongo)
    await mongo.start()
    settings = make_scenario(
        "mongo_disk_full", mongo_uri=mongo.uri, ttr_s=15, timeout_ms=2000, simulation={"latency_ms": 5}
    )
    began = time.monotonic()
    async with MailStore(settings) as store:
        feeder = Feeder(settings, "mdf")
        await feeder.run(N_MONGO, batch=100)
        assert len(feeder.accepted) == N_MONGO and not feeder.errors
        consumers = [ConsumerProcess(settings, tmp_path, concurrency=n) for n in MONGO_CONSUMER_LOOPS]
        for c in consumers:
            procs.add(c)
        await asyncio.gather(*(c.start() for c in consumers))

        async def some_sent() -> bool:
            return await store.mails.count_documents({"status": {"$eq": "sent"}}) >= N_MONGO // 8

        await wait_until(some_sent, within=30, what="some mails sent before the disk fills")
        filled_bytes = await asyncio.to_thread(disk.fill)
        filled = time.monotonic()
        late = ConsumerProcess(settings, tmp_path, concurrency=5, tag="-started-full")
        procs.add(late)
        said, late_alive = await boot_message(late, within=20)
        await hold_full(disk, MONGO_FULL_S - (time.monotonic() - filled))
        sent_at_free = await store.mails.count_documents({"status": {"$eq": "sent"}})
        disk.free()
        freed = time.monotonic()
        # The bound: a put-off job waits up to 30 s (delivery._put_off), a held claim its 15 s
        # lease, then the backlog drains; 45 s had been met with 3 s to spare on a quiet machine.
        settled = await settled_within(store, N_MONGO, within=75, what="after the space was freed")
        everyone = [*consumers, late]
        t = await tally(store, feeder.accepted, total_sends(everyone))
        logs = [c.output() for c in everyone]
        twins = sum(log.count("deleting this twin job") for log in logs)
        held = len({m for log in logs for m in re.findall(r"recording mail ([0-9a-f]{24}) failed", log)})
        record(
            "MongoDB data disk full 6 s",
            t,
            recover_s=None if settled is None else settled - freed,
            total_s=time.monotonic() - began,
            notes=(
                f"{filled_bytes // 1024} KB filler; {sent_at_free} of {N_MONGO} sent when freed; "
                f"{twins} job(s) deleted as twins; {held} sent mail(s) held their record; "
                f"no requeue; a consumer started while full said: {said or 'nothing'}"
                + ("" if settled is not None else f"; NOT settled 75 s after: {t.statuses}")
            ),
        )
        for c in consumers:
            assert await c.terminate() == 0, c.tail()
        await late.terminate()
    assert_clean(t)
    assert t.sent_once == N_MONGO
    assert twins == 0, f"{twins} job(s) deleted as twins while MongoDB refused writes"
    assert said, "a consumer started while the disk is full should say why it cannot work"
    assert "cannot reach MongoDB" not in said, f"MongoDB is reachable, its disk is full: {said}"
    assert re.search(r"full|space|refus", said, re.IGNORECASE), said
    assert late_alive or (late.proc is not None and late.proc.returncode != 0)


def own_binlog_settings(fault_base: Settings, port: int, mongo_uri: str) -> Settings:
    return scenario_settings(
        fault_base,
        "binlog_full",
        beanstalkd_port=port,
        mongo_uri=mongo_uri,
        ttr_s=5,
        simulation={"latency_ms": 20},
    )


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_beanstalkd_binlog_disk_full(
    small_disk: MakeDisk, fault_base: Settings, session_mongo: Mongo, procs: Processes, tmp_path: Path
) -> None:
    """beanstalkd's binlog directory is a 4 MB tmpfs with 16 KB binlog files, filled while a
    producer sends and a consumer delivers, kept full for 3 s, then freed. Puts fail with
    OUT_OF_MEMORY: the producer gets EnqueueError for mails stored but not queued (and does
    not retry them). After the space is freed and the tube has drained, `mailer requeue
    --older-than 0` queues exactly those mails again (the consumer's own sweep is off)."""
    workdir = tmp_path / "bs"
    disk = small_disk(workdir / "binlog", 4)
    server = Beanstalkd(workdir)
    server.argv += ["-s", str(BINLOG_FILE_BYTES)]
    procs.add(server)
    await server.start()
    settings = own_binlog_settings(fault_base, server.port, session_mongo.uri)
    began = time.monotonic()
    async with MailStore(settings) as store:
        consumer = ConsumerProcess(settings, tmp_path, concurrency=10)
        procs.add(consumer)
        await consumer.start()
        feeder = Feeder(settings, "blf")
        feeding = asyncio.create_task(feeder.run(N_BINLOG, batch=10, pause=0.03))
        await wait_until(lambda: len(feeder.accepted) >= N_BINLOG // 4, within=30, what="a quarter accepted")
        await asyncio.to_thread(disk.fill)

        async def refused_while_full() -> bool:
            # Topped up while waiting, as while holding: beanstalkd deletes a binlog file once
            # the consumer has deleted all its jobs, and puts could then go on for good.
            await asyncio.to_thread(disk.fill)
            return bool(feeder.stored_unqueued)

        await wait_until(refused_while_full, within=20, what="a put refused on the full disk")
        await hold_full(disk, BINLOG_FULL_S)
        unqueued_while_full = len(set(feeder.stored_unqueued))
        disk.free()
        freed = time.monotonic()
        await asyncio.wait_for(feeding, 60)
        await wait_until(lambda: tube_drained(settings), within=30, what="the tube to drain")
        rc, out, err = await run_cli(settings, tmp_path, "requeue", "--older-than", "0")
        assert rc == 0, err
        m = re.search(r"requeued (\d+) of (\d+)", out)
        assert m, out
        requeued = int(m.group(1))
        settled = await settled_within(store, N_BINLOG, within=45, what="after `mailer requeue`")
        unqueued = len(set(feeder.stored_unqueued))
        t = await tally(store, feeder.accepted, total_sends([consumer]))
        record(
            "beanstalkd binlog disk full 3 s (`mailer requeue`)",
            t,
            recover_s=None if settled is None else settled - freed,
            total_s=time.monotonic() - began,
            notes=(
                f"puts refused (OUT_OF_MEMORY): {unqueued} mails stored but not queued "
                f"({unqueued_while_full} while full), producer errors {dict(feeder.error_types)}; "
                f"`mailer requeue --older-than 0` requeued {requeued}"
                + ("" if settled is not None else f"; NOT settled 75 s after: {t.statuses}")
            ),
        )
        assert await consumer.terminate() == 0, consumer.tail()
    assert not feeder.unexpected_errors(), feeder.unexpected_errors()
    assert feeder.error_types["EnqueueError"] > 0, dict(feeder.error_types)
    assert all("OUT_OF_MEMORY" in str(e) for e in feeder.errors), [str(e) for e in feeder.errors[:3]]
    assert len(feeder.accepted) == N_BINLOG
    assert requeued == unqueued, (requeued, unqueued, out)
    assert_clean(t)
    assert t.sent_once == N_BINLOG
