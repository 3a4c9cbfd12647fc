"""Helpers for the consumer, delivery and routing tests: bounded waits, an in-process
consumer run as a task, a consumer subprocess, an injectable clock, queue inspection."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from bson import ObjectId

from mailer.beanstalk import Beanstalk, Job
from mailer.config import Settings
from mailer.consumer import Consumer
from mailer.delivery import Decision
from mailer.errors import NotFound
from mailer.jobs import OwnedJob, run_job
from mailer.producer import Producer
from mailer.store import Doc, MailStore
from mailer.vendors.fake import FakeVendor

ROOT = Path(__file__).resolve().parent.parent
VENDOR_NAMES = ("amazon", "mailgun", "sendinblue", "sparkpost")
T = TypeVar("T")
MakeSettings = Callable[..., Awaitable[Settings]]


def mail(i: int = 0, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "from": "Sender <sender@example.com>",
        "to": f"rcpt{i}@example.com",
        "subject": f"Hello {i}",
        "text": "Hello there",
    }
    base.update(changes)
    return base


async def wait_until(
    condition: Callable[[], T | Awaitable[T]],
    *,
    within: float = 30.0,
    interval: float = 0.02,
    what: str = "the condition",
) -> T:
    """Poll ``condition`` (sync or async) until it is truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f} s waiting for {what} (last: {result!r})")
        await asyncio.sleep(interval)


class FakeClock:
    """Epoch seconds that move only when told: cooldowns are crossed without sleeping."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake_vendors(**options: dict[str, Any]) -> list[FakeVendor]:
    """The four default vendor names as FakeVendors; ``mailgun={"default": err}`` scripts one."""
    return [FakeVendor(name, **options.get(name, {})) for name in VENDOR_NAMES]


def with_consumer(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with fields of its frozen ``consumer`` section changed."""
    return settings.model_copy(update={"consumer": settings.consumer.model_copy(update=changes)})


def with_beanstalkd(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"beanstalkd": settings.beanstalkd.model_copy(update=changes)})


@contextlib.asynccontextmanager
async def running_consumer(
    settings: Settings,
    vendors: Sequence[Any],
    *,
    concurrency: int = 4,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Consumer]:
    """An in-process Consumer whose ``run()`` is a task; stopped (bounded) on exit."""
    kwargs: dict[str, Any] = {"concurrency": concurrency, "vendors": vendors}
    if clock is not None:
        kwargs["clock"] = clock
    async with Consumer(settings, **kwargs) as consumer:
        task = asyncio.create_task(consumer.run())
        try:
            yield consumer
        finally:
            consumer.stop()
            try:
                await asyncio.wait_for(task, settings.consumer.grace_s + 15)
            except BaseException:
                task.cancel()
                raise


async def produce(settings: Settings, n: int, *, start: int = 0) -> list[str]:
    async with Producer(settings) as producer:
        return await producer.send_many([mail(start + i) for i in range(n)])


async def put_bodies(settings: Settings, *bodies: bytes, ttr: int | None = None) -> list[int]:
    """Put raw job bodies on the settings' tube (poison jobs, twins, redeliveries)."""
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as bs:
        await bs.use(b.tube)
        return [await bs.put(body, ttr=ttr or b.ttr_s) for body in bodies]


async def job_stats(settings: Settings, job_id: int) -> dict[str, Any] | None:
    """``stats-job`` of a job (state, delay, releases, buries...) or None once deleted."""
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as bs:
        try:
            return dict(await bs.stats_job(job_id))
        except NotFound:
            return None


async def kick_job(settings: Settings, job_id: int) -> None:
    """Make a delayed (or buried) job ready now, so a test need not wait out a back-off."""
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as bs:
        await bs.kick_job(job_id)


async def tube_counts(settings: Settings) -> dict[str, int]:
    """Jobs of the settings' tube by state (all 0 when beanstalkd has forgotten the tube)."""
    b = settings.beanstalkd
    keys = ("ready", "reserved", "delayed", "buried")
    async with Beanstalk(b.host, b.port) as bs:
        try:
            stats = await bs.stats_tube(b.tube)
        except NotFound:
            return dict.fromkeys(keys, 0)
    return {k: int(stats[f"current-jobs-{k}"]) for k in keys}


async def tube_empty(settings: Settings) -> bool:
    return not any((await tube_counts(settings)).values())


async def docs(store: MailStore, ids: Sequence[str], projection: Doc | None = None) -> dict[str, Doc]:
    found = store.mails.find({"_id": {"$in": [ObjectId(i) for i in ids]}}, projection)
    return {str(d["_id"]): d async for d in found}


async def wait_all_status(
    store: MailStore, ids: Sequence[str], status: str, *, within: float = 30.0
) -> dict[str, Doc]:
    """Wait until every mail of ``ids`` has ``status``; return their whole documents."""
    last: dict[str, Doc] = {}

    async def done() -> bool:
        nonlocal last
        last = await docs(store, ids, {"status": 1})  # light polling; whole documents once at the end
        return len(last) == len(ids) and all(d["status"] == status for d in last.values())

    try:
        await wait_until(done, within=within, interval=0.1, what=f"{len(ids)} mails {status}")
    except AssertionError:
        by_status = collections.Counter(d["status"] for d in last.values())
        raise AssertionError(f"not every mail reached {status!r} within {within} s: {by_status}") from None
    return await docs(store, ids)


async def vendor_mark(store: MailStore, name: str) -> Doc | None:
    return await store.vendor_status.find_one({"_id": name})


# --- a consumer in its own process ------------------------------------------------------


def consumer_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """Environment that points ``python -m mailer.consumer --test`` at the settings' unique
    tube and collections (``--test`` takes them from the [test] section)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    b, m = settings.beanstalkd, settings.mongodb
    env.update(
        {
            "MAILER_TEST__TUBE": b.tube,
            "MAILER_TEST__COLLECTION": m.collection,
            "MAILER_TEST__VENDOR_STATUS_COLLECTION": m.vendor_status_collection,
            "MAILER_BEANSTALKD__HOST": b.host,
            "MAILER_BEANSTALKD__PORT": str(b.port),
            "MAILER_BEANSTALKD__TTR_S": str(b.ttr_s),
            "MAILER_MONGODB__URI": m.uri.get_secret_value(),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class ConsumerProcess:
    """``python -m mailer.consumer --test`` with its output in files (never a full pipe)."""

    def __init__(self, settings: Settings, workdir: Path, *, concurrency: int = 10, **env: object) -> None:
        self.settings = settings
        workdir.mkdir(parents=True, exist_ok=True)
        n = len(list(workdir.glob("consumer-*.out")))
        self.out_path = workdir / f"consumer-{n}.out"
        self.err_path = workdir / f"consumer-{n}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailer.consumer", "--test", "--concurrency", str(concurrency)],
            cwd=ROOT,
            env=consumer_env(settings, **env),
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    async def wait_started(self, within: float = 20.0) -> None:
        """Until its loops run (it logs its tube once connected)."""

        def started() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"consumer exited with {self.proc.returncode}:\n{self.stderr()}")
            return "simulated vendors" in self.stderr() or "production" in self.stderr()

        await wait_until(started, within=within, interval=0.05, what="the consumer process to start")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait(self, within: float = 30.0) -> int:
        """Its exit code; fails (and kills it) when it does not exit in time."""
        try:
            await wait_until(
                lambda: self.proc.poll() is not None, within=within, interval=0.05, what="consumer exit"
            )
        except AssertionError:
            self.kill()
            raise
        self._close_files()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_files()

    async def stop(self, within: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return await self.wait(within)

    def _close_files(self) -> None:
        for f in (self._out, self._err):
            if not f.closed:
                f.close()


# --- driving deliveries one job at a time -------------------------------------------------


class DeliveryRig:
    """A connected (not running) Consumer whose Delivery the test drives job by job on a
    reserving connection of its own: exact, and no reserve loop to stop afterwards."""

    def __init__(self, consumer: Consumer, queue: Beanstalk, vendors: Sequence[FakeVendor]) -> None:
        self.consumer = consumer
        self.queue = queue
        self.vendors = list(vendors)
        self.store = consumer.store
        self.registry = consumer.registry
        self.settings = consumer.settings
        consumer.delivery.rand = lambda: 0.0  # no back-off jitter: delays are asserted exactly

    def vendor(self, name: str) -> FakeVendor:
        return next(v for v in self.vendors if v.name == name)

    def sends(self) -> dict[str, int]:
        return {v.name: len(v.sends) for v in self.vendors}

    async def reserve(self, wait_s: int = 5) -> Job:
        return await self.queue.reserve(wait_s)

    async def handle(self, job: Job) -> Decision:
        """Handle a reserved job as a reserve loop does (claim, send, record, finish)."""
        return await run_job(OwnedJob(job, self.queue, self.consumer.delivery))

    async def step(self, wait_s: int = 5) -> tuple[Job, Decision]:
        job = await self.reserve(wait_s)
        return job, await self.handle(job)

    def picked(self, job: Job) -> FakeVendor:
        """The vendor round robin gives this job while all are available."""
        return self.vendors[job.id % len(self.vendors)]

    async def doc(self, mail_id: str) -> Doc:
        found = await self.store.mails.find_one({"_id": ObjectId(mail_id)})
        assert found is not None
        return found


@contextlib.asynccontextmanager
async def delivery_rig(
    settings: Settings, vendors: Sequence[FakeVendor], *, clock: Callable[[], float] | None = None
) -> AsyncIterator[DeliveryRig]:
    kwargs: dict[str, Any] = {"concurrency": 1, "vendors": vendors}
    if clock is not None:
        kwargs["clock"] = clock
    b = settings.beanstalkd
    async with Consumer(settings, **kwargs) as consumer, Beanstalk(b.host, b.port) as queue:
        await queue.watch(b.tube)
        await queue.ignore("default")
        yield DeliveryRig(consumer, queue, vendors)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnBeanstalkd:
    """A second beanstalkd on a free port with its own binlog; always killed at the end."""

    def __init__(self, binlog: Path) -> None:
        self.binlog = binlog
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("beanstalkd")
        if exe is None:
            pytest.skip("beanstalkd is not installed")
        self.proc = subprocess.Popen(
            [exe, "-l", "127.0.0.1", "-p", str(self.port), "-b", str(self.binlog)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"beanstalkd on port {self.port} exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"beanstalkd on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None
