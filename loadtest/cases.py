"""The mailer's own benchmark cases: producer ``send``/``send_many`` and consumer drains.

Producers run in this process (their CPU is this process's CPU over the timed section:
nothing else runs meanwhile). Consumers run as the real ``mailer.consumer`` child process,
whose CPU and peak RSS are read from /proc. Every case gets its own tube and collections,
dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from loadtest import children
from loadtest.common import child_env, drain_tube, drop_collections, sample_mail, tube_stats, unique_suffix
from loadtest.procstat import ProcWatch, server_pids
from loadtest.producer import Mode, ProduceResult, produce
from loadtest.raw import Measure, mail_docs, timed
from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.producer import Producer
from mailer.store import MailStore

DRAIN_POLL_S = 0.02


@contextlib.asynccontextmanager
async def scratch(base: Settings, kind: str) -> AsyncIterator[Settings]:
    """Settings on a tube and collections of their own, emptied and dropped on the way out."""
    settings = base.for_test(unique_suffix(kind))
    try:
        yield settings
    finally:
        await drain_tube(settings)
        await drop_collections(settings)


async def producer_case(base: Settings, mode: Mode, n: int) -> Measure:
    """``n`` mails through ``Producer.send`` (50 tasks) or ``send_many`` (batches of 1,000)."""
    mails = [sample_mail("bench", i) for i in range(n)]
    async with scratch(base, "bp") as settings, Producer(settings) as producer:
        results: list[ProduceResult] = []
        measure = await timed(n, lambda: _append(results, produce(producer, mails, mode)))
    if results[0].errors:
        raise RuntimeError(f"producer {mode}: {results[0].errors} mails failed: {results[0].first_error}")
    return measure


async def _append(results: list[ProduceResult], work: Awaitable[ProduceResult]) -> None:
    results.append(await work)


@dataclass(slots=True)
class Drain:
    mails: int
    seconds: float
    consumer_cpu_s: float
    consumer_rss_kb: int
    server_cpu_s: dict[str, float] = field(default_factory=dict)
    stall_s: float | None = None

    @property
    def rate(self) -> float:
        return self.mails / self.seconds if self.seconds > 0 else 0.0

    @property
    def consumer_cpu_us(self) -> float:
        return self.consumer_cpu_s / max(1, self.mails) * 1e6


async def _wait_deleted(bs: Beanstalk, tube: str, target: int, deadline_s: float) -> float:
    """Poll ``cmd-delete`` until it reaches ``target``; the monotonic time it was seen."""
    deadline = time.monotonic() + deadline_s
    while (await tube_stats(bs, tube)).get("cmd-delete", 0) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"tube {tube}: fewer than {target} jobs deleted after {deadline_s:.0f} s")
        await asyncio.sleep(DRAIN_POLL_S)
    return time.monotonic()


class Observer(Protocol):
    """Something watching the drain window itself (the profiler attaches here)."""

    async def started(self, pids: list[int]) -> None: ...

    async def finished(self) -> None: ...


async def drain_case(
    base: Settings,
    *,
    mails: int,
    processes: int,
    concurrency: int,
    latency_ms: float,
    stall_probe: bool,
    observer: Observer | None = None,
    consumer_args: Sequence[str] = (),
) -> Drain:
    """Store ``mails`` mails, start the consumers and wait until every reserve loop is ready,
    then put all the jobs at once (pipelined) and time until the last one is deleted."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    async with scratch(base, "bd") as settings, MailStore(settings) as store:
        docs = mail_docs(mails, "bench")
        for i in range(0, mails, 1000):
            await store.mails.insert_many(docs[i : i + 1000])
        env = child_env(settings, latency_ms=latency_ms, measure_throughput=False)
        consumers = await children.start_consumers(processes, concurrency, env, log_dir, consumer_args)
        watch = ProcWatch()
        for name, pid in server_pids().items():
            watch.add(name, pid, "server", own=False)
        for c in consumers:
            watch.add(c.name, c.pid, "consumer")
        b = settings.beanstalkd
        try:
            await children.wait_watching(settings, processes * concurrency, 60.0, consumers)
            async with Beanstalk(b.host, b.port) as bs, Producer(settings) as producer:
                await bs.use(b.tube)
                if observer is not None:
                    await observer.started([c.pid for c in consumers])
                watch.start()
                t0 = time.monotonic()
                for i in range(0, mails, 1000):
                    await bs.put_many([str(d["_id"]).encode() for d in docs[i : i + 1000]])
                t1 = await _wait_deleted(bs, b.tube, mails, 30 + mails / 50)
                watch.stop()
                if observer is not None:
                    await observer.finished()
                stall = await _stall(bs, producer, b.tube, mails) if stall_probe else None
        except BaseException:
            await children.stop(consumers)
            print(f"consumer logs kept in {log_dir}", file=sys.stderr)
            raise
        await children.stop(consumers)
    shutil.rmtree(log_dir, ignore_errors=True)
    procs = watch.procs.values()
    return Drain(
        mails=mails,
        seconds=t1 - t0,
        consumer_cpu_s=watch.group_cpu("consumer"),
        consumer_rss_kb=max(u.peak_rss_kb for u in procs if u.group == "consumer"),
        server_cpu_s={u.name: u.cpu_s for u in procs if u.group == "server"},
        stall_s=stall,
    )


async def _stall(bs: Beanstalk, producer: Producer, tube: str, deleted: int) -> float:
    """The "no stall" figure: once the tube has run dry, how long one new mail takes from its
    send to the delete of its job. Probed at once and again after 2 s of idling (an idle
    consumer must not be asleep somewhere); the worse of the two counts."""
    worst = 0.0
    for idle in (0.0, 2.0):
        await asyncio.sleep(idle)
        t0 = time.monotonic()
        await producer.send(sample_mail("stall", deleted))
        deleted += 1
        worst = max(worst, await _wait_deleted(bs, tube, deleted, 60.0) - t0)
    return worst
