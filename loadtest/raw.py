"""Raw baselines: what the servers do with the least client code in front of them.

Each mailer figure in the benchmark is set beside one of these, measured in the same run on
the same servers, so a ratio says how much the mailer's own code costs, whatever the
machine. The MongoDB baselines use pymongo's AsyncMongoClient directly on a scratch
collection that has the mails collection's indexes (``MailStore.ensure_indexes``).

Their documents are one frozen shape (:func:`baseline_docs`), not the producer's own: a
baseline built by the code under test moves with it, so a leaner stored document would speed
up the baseline as much as the producer and the ratio would hide the gain (or show a loss).
The drains seed real documents (:func:`mail_docs`): the consumer must read what the producer
stores.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from bson import ObjectId
from pymongo import ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection

from loadtest.common import sample_mail
from loadtest.procstat import cpu_seconds, server_pids
from mailer.models import parse_email
from mailer.store import Doc, MailStore

T = TypeVar("T")


def cpu_now() -> float:
    """User + system CPU of this process, every thread included (pymongo's too), in ns
    resolution (``os.times`` counts 10 ms ticks: too coarse for a 0.5 s section)."""
    return time.process_time()


@dataclass(slots=True)
class Measure:
    ops: int
    seconds: float
    cpu_s: float = 0.0  # client CPU of this process over the timed section
    server_cpu_s: dict[str, float] = field(default_factory=dict)  # each server's, same section

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / max(1, self.ops) * 1e6

    def server_us(self) -> str:
        """Each server's CPU per operation, for the progress lines and the JSON."""
        return ", ".join(
            f"{name} {cpu / max(1, self.ops) * 1e6:,.0f}" for name, cpu in self.server_cpu_s.items()
        )


async def timed(ops: int, work: Callable[[], Awaitable[object]]) -> Measure:
    """Time ``work``; with this process's CPU and each local server's over the same section.

    The heap the earlier cases left (their mails, documents, results) is collected and
    frozen first, as a service freezes its start-up heap: otherwise a full collection inside
    the section walks every object of every case before it, and a row's CPU would depend on
    how far into the run it is measured.
    """
    gc.collect()
    gc.freeze()
    servers = server_pids()
    s0 = {name: cpu_seconds(pid) or 0.0 for name, pid in servers.items()}
    try:
        c0, t0 = cpu_now(), time.perf_counter()
        await work()
        m = Measure(ops, time.perf_counter() - t0, cpu_now() - c0)
    finally:
        gc.unfreeze()
    m.server_cpu_s = {name: (cpu_seconds(pid) or 0.0) - s0[name] for name, pid in servers.items()}
    return m


def mail_docs(n: int, run: str = "raw") -> list[Doc]:
    """Documents exactly as ``Producer.send`` stores them (built outside any timed section)."""
    return [MailStore.new_document(parse_email(sample_mail(run, i)), priority=1024) for i in range(n)]


def baseline_docs(n: int, run: str = "raw") -> list[Doc]:
    """Mail documents of one frozen shape that does not depend on the code under test (see
    the module's note): the sample mail as given, under the eight top-level fields a stored
    mail had when the shape was fixed (2026-12; the server's cost per insert grows with the
    number of fields, so the count matters as much as the content)."""
    now = dt.datetime.now(dt.UTC)
    ts = now.timestamp()
    docs: list[Doc] = []
    for i in range(n):
        oid = ObjectId()
        docs.append(
            {
                "_id": oid,
                "status": "queued",
                "mail": sample_mail(run, i),
                "priority": 1024,
                "created_at": now,
                "next_attempt_ts": ts,
                "batch": str(oid),
                "queued_ts": ts,
            }
        )
    return docs


async def concurrently(n_tasks: int, items: Sequence[T], op: Callable[[T], Awaitable[object]]) -> None:
    """Run ``op`` over ``items`` from ``n_tasks`` tasks, each taking the next item."""
    pending = iter(items)

    async def worker() -> None:
        for item in pending:
            await op(item)

    await asyncio.gather(*(worker() for _ in range(n_tasks)))


# --- beanstalkd ---------------------------------------------------------------------------


async def beanstalkd_puts(host: str, port: int, tube: str, n: int) -> Measure:
    """``n`` puts written back to back on one connection, replies read as they come; then
    the jobs are deleted the same way. The client only counts lines, so this is beanstalkd's
    (and the loopback's) own rate."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"use {tube}\r\n".encode())
        await reader.readuntil(b"\r\n")
        body = b"0" * 24  # a mail id's length
        put = b"put 1024 0 120 24\r\n" + body + b"\r\n"

        async def write_puts() -> None:
            for i in range(0, n, 1000):
                writer.write(put * min(1000, n - i))
                await writer.drain()

        replies = bytearray()

        async def run() -> None:
            writing = asyncio.create_task(write_puts())
            while replies.count(b"\r\n") < n:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    raise ConnectionError("beanstalkd closed the connection")
                replies.extend(chunk)
            await writing

        measure = await timed(n, run)
        ids = [int(line.split()[1]) for line in bytes(replies).split(b"\r\n") if line.startswith(b"INSERTED")]
        writer.write(b"".join(b"delete %d\r\n" % i for i in ids))
        seen = 0
        while seen < len(ids):
            seen += (await reader.read(1 << 16)).count(b"\r\n")
        return measure
    finally:
        writer.close()


# --- nx-27017 (or MongoDB) ------------------------------------------------------------------


async def insert_one_concurrent(coll: AsyncCollection[Doc], docs: list[Doc], tasks: int = 50) -> Measure:
    async def op(doc: Doc) -> None:
        await coll.insert_one(doc)

    return await timed(len(docs), lambda: concurrently(tasks, docs, op))


async def insert_many_batches(coll: AsyncCollection[Doc], docs: list[Doc], batch: int = 1000) -> Measure:
    async def run() -> None:
        for i in range(0, len(docs), batch):
            await coll.insert_many(docs[i : i + batch], ordered=False)

    return await timed(len(docs), run)


async def claim_by_id_concurrent(coll: AsyncCollection[Doc], ids: list[ObjectId], tasks: int = 50) -> Measure:
    """find_one_and_update by ``_id`` returning the document: the core of a consumer's claim."""

    async def op(oid: ObjectId) -> None:
        await coll.find_one_and_update(
            {"_id": oid},
            {"$set": {"status": "sending", "lease_until": time.time() + 120}, "$inc": {"rounds": 1}},
            return_document=ReturnDocument.AFTER,
        )

    return await timed(len(ids), lambda: concurrently(tasks, ids, op))


async def bulk_updates(coll: AsyncCollection[Doc], ids: list[ObjectId], batch: int = 100) -> Measure:
    """bulk_write of ``batch`` final-status updates at a time, one batch after the other."""

    async def run() -> None:
        for i in range(0, len(ids), batch):
            ops = [
                UpdateOne(
                    {"_id": oid},
                    {"$set": {"status": "sent", "lease_until": 0.0}, "$currentDate": {"sent_at": True}},
                )
                for oid in ids[i : i + batch]
            ]
            await coll.bulk_write(ops, ordered=False)

    return await timed(len(ids), run)


async def mongo_baselines(store: MailStore, n_one: int, n_many: int) -> dict[str, Measure]:
    """All four MongoDB baselines on ``store``'s (scratch) collection, dropped in between so
    every insert sees a collection of the same size."""
    coll = store.mails
    out: dict[str, Measure] = {}
    docs = baseline_docs(n_one)
    out["raw_insert_one"] = await insert_one_concurrent(coll, docs)
    await coll.drop()
    await store.ensure_indexes()
    docs = baseline_docs(n_many)
    out["raw_insert_many"] = await insert_many_batches(coll, docs)
    ids = [doc["_id"] for doc in docs]
    out["raw_claim"] = await claim_by_id_concurrent(coll, ids[:n_one])
    out["raw_bulk"] = await bulk_updates(coll, ids)
    await coll.drop()
    return out
