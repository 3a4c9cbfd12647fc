"""The lone caller's cases (issue 16): ``send`` awaited in turn, and ``send_many``, each
beside a raw baseline that does what the original Node implementation did per mail.

The baselines store the original's document (``{from, to, subject, text}``) in a collection
with no secondary index, from the same Python and pymongo, on the same servers, in the same
run: one ``insert_one`` then one ``put`` per mail, awaited in turn; and one ``insert_many``
of 1,000 such documents then one pipelined ``put_many``. Each case runs right after its
baseline, so a busy moment of the (shared) machine hits both.

``python -m loadtest.lonecases --rounds 5`` runs just these, interleaved, and prints medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from bson import ObjectId
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from loadtest.common import drain_tube, drop_collections, sample_mail, settings_or_exit, unique_suffix
from loadtest.raw import Measure, timed
from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.producer import Producer
from mailer.store import Doc, MailStore

PROG = "python -m loadtest.lonecases"
BATCH = 1000


@contextlib.asynccontextmanager
async def plain_collection(settings: Settings) -> AsyncIterator[AsyncCollection[Doc]]:
    """The scratch collection through a client with pymongo's defaults (what an
    application that calls pymongo itself would use), with no secondary index."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(settings.mongodb.uri.get_secret_value())
    try:
        async with MailStore(settings, client=client) as store:
            await store.mails.drop_indexes()
            yield store.mails
    finally:
        await client.close()


def original_doc(mail: dict[str, Any]) -> Doc:
    """What the original stored per mail: the four fields, nothing else."""
    return {k: mail[k] for k in ("from", "to", "subject", "text")}


async def _raw_lone(settings: Settings, mails: Sequence[dict[str, Any]], latencies: list[float]) -> Measure:
    b = settings.beanstalkd
    docs = [original_doc(m) for m in mails]
    async with plain_collection(settings) as coll, Beanstalk(b.host, b.port) as bs:
        await bs.use(b.tube)

        async def run() -> None:
            for doc in docs:
                t0 = time.perf_counter()
                result = await coll.insert_one(doc)
                await bs.put(str(result.inserted_id).encode())
                latencies.append(time.perf_counter() - t0)

        return await timed(len(docs), run)


async def _raw_many(settings: Settings, mails: Sequence[dict[str, Any]]) -> Measure:
    b = settings.beanstalkd
    docs = [original_doc(m) for m in mails]
    async with plain_collection(settings) as coll, Beanstalk(b.host, b.port) as bs:
        await bs.use(b.tube)

        async def run() -> None:
            for i in range(0, len(docs), BATCH):
                result = await coll.insert_many(docs[i : i + BATCH], ordered=False)
                await bs.put_many([str(oid).encode() for oid in result.inserted_ids])

        return await timed(len(docs), run)


async def _lone_send(settings: Settings, mails: Sequence[dict[str, Any]], latencies: list[float]) -> Measure:
    async with Producer(settings) as producer:

        async def run() -> None:
            for mail in mails:
                t0 = time.perf_counter()
                await producer.send(mail)
                latencies.append(time.perf_counter() - t0)

        return await timed(len(mails), run)


async def _send_many(settings: Settings, mails: Sequence[dict[str, Any]]) -> Measure:
    async with Producer(settings) as producer:

        async def run() -> None:
            for i in range(0, len(mails), BATCH):
                await producer.send_many(mails[i : i + BATCH])

        return await timed(len(mails), run)


async def _scratch(base: Settings, kind: str, work: Callable[[Settings], Awaitable[Measure]]) -> Measure:
    """``work`` on a tube and collection of its own, emptied and dropped afterwards."""
    settings = base.for_test(unique_suffix(kind))
    try:
        return await work(settings)
    finally:
        await drain_tube(settings)
        await drop_collections(settings)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


async def run(base: Settings, n: int, note: Callable[[str, str], None] | None = None) -> dict[str, float]:
    """One round of every lone case, each after its baseline; the row values."""
    mails = [sample_mail("lone", i) for i in range(n)]
    raw_lat: list[float] = []
    lone_lat: list[float] = []
    raw = await _scratch(base, "rl", lambda s: _raw_lone(s, mails, raw_lat))
    lone = await _scratch(base, "ls", lambda s: _lone_send(s, mails, lone_lat))
    raw_many = await _scratch(base, "rm", lambda s: _raw_many(s, mails))
    many = await _scratch(base, "sm", lambda s: _send_many(s, mails))
    values = {
        "raw_lone": raw.rate,
        "raw_lone_cpu": raw.cpu_us,
        "raw_lone_p50": _pct(raw_lat, 0.50),
        "raw_lone_p99": _pct(raw_lat, 0.99),
        "lone_send": lone.rate,
        "lone_p50": _pct(lone_lat, 0.50),
        "lone_p99": _pct(lone_lat, 0.99),
        "cpu_lone": lone.cpu_us,
        "cpu_lone_x": lone.cpu_us / raw.cpu_us if raw.cpu_us else 0.0,
        "raw_many_put": raw_many.rate,
        "raw_many_put_cpu": raw_many.cpu_us,
        "many_send": many.rate,
        "cpu_many_send": many.cpu_us,
    }
    if note is not None:
        note("raw_lone", f"{raw.rate:,.0f} mails/s; CPU us/mail client {raw.cpu_us:,.0f}, {raw.server_us()}")
        note(
            "lone_send",
            f"{lone.rate:,.0f} mails/s ({lone.rate / raw.rate:.2f}); CPU us/mail client "
            f"{lone.cpu_us:,.0f} ({values['cpu_lone_x']:.2f}x), {lone.server_us()}; "
            f"p50 {values['lone_p50']:.2f} ms, p99 {values['lone_p99']:.2f} ms",
        )
        note("raw_many_put", f"{raw_many.rate:,.0f} mails/s; {raw_many.server_us()}")
        note(
            "many_send",
            f"{many.rate:,.0f} mails/s ({many.rate / raw_many.rate:.2f}); CPU us/mail {many.cpu_us:,.0f}, "
            f"{many.server_us()}",
        )
    return values


async def decompose(base: Settings, n: int) -> dict[str, float]:
    """Where the lone send's time goes, step by step from the raw baseline to ``send``, each
    on a fresh collection and awaited in turn: the original's document, then ours (built
    beforehand, so no validation), then ours with the mails collection's indexes, then with
    the suppression check's query before each insert; then ``send`` itself."""
    mails = [sample_mail("lone", i) for i in range(n)]
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}

    async def steps(settings: Settings) -> Measure:
        b = settings.beanstalkd
        async with Producer(settings) as producer, plain_collection(settings) as plain:
            ours = [producer._entry(producer.validate(m)).doc for m in mails]
            indexed = producer.store.mails
            suppressions = producer.store.suppressions
            q = producer.queue
            await suppressions.insert_one({"_id": "listed@elsewhere.example", "reason": "bench"})
            variants: list[tuple[str, Callable[[], Awaitable[None]]]] = []

            async def loop(coll: AsyncCollection[Doc], docs: Sequence[Doc], check: bool) -> None:
                for doc in docs:
                    if check:
                        await suppressions.find({"_id": {"$in": ["x@example.com"]}}, {"_id": 1}).to_list()
                    await coll.insert_one(doc)
                    await q.put(str(doc["_id"]), ttr=b.ttr_s)

            def fresh() -> list[Doc]:
                return [{**d, "_id": ObjectId()} for d in ours]

            variants.append(
                ("original doc, no index", lambda: loop(plain, [original_doc(m) for m in mails], False))
            )
            variants.append(("our doc, no index", lambda: loop(plain, fresh(), False)))
            variants.append(("our doc, our indexes", lambda: loop(indexed, fresh(), False)))
            variants.append(("+ suppression query", lambda: loop(indexed, fresh(), True)))

            async def send() -> None:
                for m in mails:
                    await producer.send(m)

            variants.append(("send", send))
            last = Measure(0, 0.0, 0.0)
            for name, work in variants:
                last = await timed(n, work)
                rates[name] = last.rate
                cpu[name] = last.cpu_us
            return last

    await _scratch(base, "ld", steps)
    return rates | {f"{name} cpu": us for name, us in cpu.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--mails", type=int, default=10000, help="mails per case and round (10,000)")
    p.add_argument(
        "--decompose",
        action="store_true",
        help="instead: the lone send's cost step by step from the raw baseline",
    )
    a = p.parse_args(argv)
    base = settings_or_exit(PROG).for_test()
    if a.decompose:
        runs = [asyncio.run(decompose(base, a.mails)) for _ in range(a.rounds)]
        raw = statistics.median(r["original doc, no index"] for r in runs)
        raw_cpu = statistics.median(r["original doc, no index cpu"] for r in runs)
        for key in (k for k in runs[0] if not k.endswith(" cpu")):
            rate = statistics.median(r[key] for r in runs)
            us = statistics.median(r[f"{key} cpu"] for r in runs)
            print(
                f"  {key:<26} {rate:7,.0f} mails/s  {rate / raw:.2f} of raw;"
                f" client CPU {us:5,.0f} us/mail {us / raw_cpu:.2f}x"
            )
        return 0

    def note(key: str, text: str) -> None:
        print(f"  {key:<14} {text}", flush=True)

    rounds: list[dict[str, float]] = []
    for i in range(a.rounds):
        print(f"round {i + 1} of {a.rounds}", flush=True)
        rounds.append(asyncio.run(run(base, a.mails, note)))
    ratio = {
        "lone_send / raw_lone": [r["lone_send"] / r["raw_lone"] for r in rounds],
        "cpu_lone / raw_lone_cpu": [r["cpu_lone_x"] for r in rounds],
        "many_send / raw_many_put": [r["many_send"] / r["raw_many_put"] for r in rounds],
    }
    print("medians:")
    for key in rounds[0]:
        print(f"  {key:<24} {statistics.median(r[key] for r in rounds):,.2f}")
    for key, values in ratio.items():
        print(f"  {key:<24} {statistics.median(values):.2f}  ({', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
