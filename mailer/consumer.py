"""The consumer process: N reserve loops on one event loop.

Each loop owns a beanstalkd connection (a reserve blocks its connection); all loops share
one MongoDB client, one vendor registry and one group committer. Signals stop the loops
from reserving, in-flight deliveries get a grace period, and whatever is still unfinished
is handed back (claim released, job released with no delay) before the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from bson import ObjectId
from pymongo.errors import PyMongoError

from mailer.beanstalk import Beanstalk, Job
from mailer.config import Settings, load_settings
from mailer.delivery import Committer, Delivery, Ready, Settle
from mailer.errors import BeanstalkError, MailerError, StoreUnavailable, TimedOut
from mailer.lifecycle import AsyncResource
from mailer.requeue import sweep
from mailer.routing import Clock, VendorRegistry
from mailer.stalls import StallWatch
from mailer.store import MailStore, parse_mail_id
from mailer.throughput import ThroughputMeter
from mailer.vendors import Vendor, build_vendors

log = logging.getLogger("mailer.consumer")


@dataclass(slots=True)
class _InFlight:
    job: Job
    queue: Beanstalk
    started: float
    touched: float


class Consumer(AsyncResource):
    """``async with Consumer(settings) as c: await c.run()``; ``c.stop()`` ends it."""

    def __init__(
        self,
        settings: Settings,
        *,
        concurrency: int | None = None,
        vendors: Sequence[Vendor] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.concurrency = concurrency or settings.consumer.concurrency
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.store = MailStore(settings)
        c = settings.consumer
        self.registry = VendorRegistry(
            list(vendors) if vendors is not None else build_vendors(settings),
            store=self.store,
            cooldown_s=c.vendor_cooldown_s,
            refresh_s=c.registry_refresh_s,
            clock=clock,
        )
        self.committer = Committer(self.store, batch=c.commit_batch)
        self.stalls = StallWatch()
        self.delivery = Delivery(
            settings,
            self.store,
            self.registry,
            self.committer,
            consumer_id=self.consumer_id,
            clock=clock,
            stalls=self.stalls,
        )
        self.meter = ThroughputMeter("Consumer", settings.throughput_interval_s)
        self.processed = 0
        self._stopping = asyncio.Event()
        self._inflight: dict[int, _InFlight] = {}  # by job id
        self._failures: dict[int, int] = {}  # consecutive beanstalkd errors, by loop
        self._detached: set[asyncio.Future[Settle]] = set()  # sends whose loop hit an error
        self._loops: list[asyncio.Task[None]] = []
        self._queues: list[Beanstalk] = []
        self._background: list[asyncio.Task[None]] = []
        self._extending: set[asyncio.Task[None]] = set()
        self._last_warning = -1e9
        self._suppressed = 0
        self._outage: str | None = None  # beanstalkd unreachable since this was logged

    def __repr__(self) -> str:
        tube = self.settings.beanstalkd.tube
        return f"<Consumer {self.consumer_id} tube={tube!r} concurrency={self.concurrency}>"

    # --- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, waiting with back-off while MongoDB cannot be reached (the same policy as
        for beanstalkd: one line when the wait starts, one when it ends). A refused
        configuration (bad URI, credentials) raises at once: waiting would not mend it."""
        pause, waited = 0.5, False
        while True:
            try:
                await self.store.connect()
                break
            except StoreUnavailable as exc:
                if self.stopping:
                    raise
                if not waited:
                    log.warning("%s; waiting for it (retrying with back-off up to 30 s)", exc)
                    waited = True
                await self._pause(pause)
                pause = min(30.0, pause * 2)
        if waited:
            log.warning("MongoDB is reachable again; starting")
        await self.registry.start()

    async def close(self) -> None:
        for task in [*self._background, *self._extending]:
            task.cancel()
        for task in [*self._background, *self._extending]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._background.clear()
        await self.stalls.close()
        await self.committer.close()
        await self.meter.stop()
        for queue in self._queues:
            await queue.close()
        await self.registry.close()
        await self.store.close()

    def stop(self) -> None:
        """Stop reserving; ``run`` then drains in-flight work within the grace period."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Run the loops until ``stop()``; then finish or hand back what is in flight."""
        loop = asyncio.get_running_loop()
        if self.settings.measure_throughput:
            self.meter.start()
        self.stalls.start()
        self._background.append(loop.create_task(self._keepalive()))
        if self.settings.consumer.requeue_interval_s > 0:
            self._background.append(loop.create_task(self._sweep_loop()))
        self._loops = [loop.create_task(self._reserve_loop(i)) for i in range(self.concurrency)]
        await self._stopping.wait()
        grace = self.settings.consumer.grace_s
        log.info("stopping: no new jobs; waiting up to %.0f s for %d in flight", grace, len(self._inflight))
        done, pending = await asyncio.wait(self._loops, timeout=grace) if self._loops else (set(), set())
        if pending and self.delivery.sending():
            done, pending = await self._await_sends(done, pending)
        if pending:
            log.warning("grace period over: handing back %d unfinished deliveries", len(self._inflight))
            unfinished = list(self._inflight.values())
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self._hand_back(unfinished)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("a reserve loop ended with an error", exc_info=task.exception())

    def send_bound_s(self) -> float:
        """The longest one send can take: the slowest vendor's timeout, which each adapter
        applies to its whole send."""
        settings = self.settings
        if settings.production:
            timeouts = [float(getattr(settings.vendors, n).timeout_s) for n in settings.vendors.configured()]
        else:
            timeouts = [settings.simulation.latency_ms / 1000]
        timeouts += [float(getattr(v, "timeout_s", 0.0) or 0.0) for v in self.registry.vendors]
        return max(timeouts, default=0.0)

    async def _await_sends(
        self, done: set[asyncio.Task[None]], pending: set[asyncio.Task[None]]
    ) -> tuple[set[asyncio.Task[None]], set[asyncio.Task[None]]]:
        """A send the vendor already has is never cut off by the grace period: cancelled, it
        would be handed back and sent again by the next consumer. Wait for such sends up to
        their timeout, then a little for their records."""
        bound = self.send_bound_s()
        log.warning(
            "grace period over with %d send(s) still at their vendors; waiting up to %.1f s more "
            "(the vendors' timeout) so that none is sent twice",
            self.delivery.sending(),
            bound,
        )

        async def wait(seconds: float) -> None:
            nonlocal pending
            finished, pending = await asyncio.wait(pending, timeout=max(0.0, seconds))
            done.update(finished)

        end = time.monotonic() + bound
        while pending and self.delivery.sending() and time.monotonic() < end:
            await wait(min(0.1, end - time.monotonic()))
        if pending and not self.delivery.sending():
            await wait(self.settings.mongodb.timeout_ms / 1000)  # their records and settles
        return done, pending

    async def _hand_back(self, unfinished: list[_InFlight]) -> None:
        for item in unfinished:
            try:
                priority = await self.delivery.hand_back(item.job)
                await item.queue.release(item.job.id, priority=priority)
            except (MailerError, PyMongoError, OSError) as exc:
                # Closing the connection releases the job anyway; the claim runs out with TTR.
                log.warning("could not hand back job %s cleanly: %s", item.job.id, exc)

    # --- the loops ---------------------------------------------------------------------

    def _new_queue(self) -> Beanstalk:
        b = self.settings.beanstalkd
        return Beanstalk(
            b.host, b.port, connect_timeout=b.connect_timeout_s, command_timeout=b.command_timeout_s
        )

    async def _open(self, queue: Beanstalk) -> None:
        await queue.connect()
        tube = self.settings.beanstalkd.tube
        await queue.watch(tube)
        if tube != "default":
            await queue.ignore("default")

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _track(self, job: Job, queue: Beanstalk) -> None:
        now = time.monotonic()
        self._inflight[job.id] = _InFlight(job, queue, now, now)

    async def _reserve(self, queue: Beanstalk, index: int) -> Job | None:
        """The next job, or None after a timeout or a (logged, backed-off) connection error."""
        try:
            if not queue.connected:
                await queue.close()
                await self._open(queue)
            job = await queue.reserve(self.settings.consumer.reserve_timeout_s)
        except TimedOut:
            self._reachable()
            return None
        except BeanstalkError as exc:
            failures = self._failures[index] = self._failures.get(index, 0) + 1
            pause = min(30.0, 0.5 * 2 ** min(failures, 6))
            if self._outage is None:  # one line per outage, not one per loop
                self._outage = str(exc)
                b = self.settings.beanstalkd
                log.warning(
                    "beanstalkd unavailable at %s:%d (%s); every loop retries with back-off (up to 30 s)",
                    b.host,
                    b.port,
                    exc,
                )
            await queue.close()
            await self._pause(pause)
            return None
        self._failures[index] = 0
        self._reachable()
        self._track(job, queue)
        return job

    def _reachable(self) -> None:
        if self._outage is not None:
            self._outage = None
            b = self.settings.beanstalkd
            log.warning("beanstalkd at %s:%d is reachable again", b.host, b.port)
        self._failures.clear()

    async def _prefetch(self, queue: Beanstalk) -> tuple[Job, Settle | Ready] | None:
        """While a mail is with its vendor, reserve and claim the next one if it is ready
        now: the claim's round trips then overlap the send instead of following it."""
        try:
            job = await queue.reserve(0)
        except BeanstalkError:  # none ready (TIMED_OUT), or the connection: the main path sees it
            return None
        self._track(job, queue)
        try:
            return job, await self.delivery.prepare(job, queue)
        except (PyMongoError, MailerError, OSError) as exc:
            self._inflight.pop(job.id, None)
            self._warn_settle(f"job {job.id} not claimed ({type(exc).__name__}: {exc}); released")
            self.delivery.claimer.forget(job)
            with contextlib.suppress(MailerError, OSError):
                await queue.release(job.id, priority=self.settings.producer.default_priority, delay=1)
            return None
        except Exception:
            self._inflight.pop(job.id, None)
            await self._bury_unexpected(queue, job)
            return None

    async def _bury_unexpected(self, queue: Beanstalk, job: Job) -> None:
        """A bug, or data no check foresaw: released, the job would come straight back and
        fail again forever. Bury it; 'mailer kick' returns it once fixed."""
        log.exception("unexpected error on job %s; burying it", job.id)
        try:
            await queue.bury(job.id)
        except (MailerError, OSError):
            await queue.close()

    async def _reserve_loop(self, index: int) -> None:
        """Reserve, claim, send, record, settle; one send at a time per loop, but the next
        mail is reserved and claimed while the current one is with its vendor, and its send
        starts while the current one's record is being written."""
        queue = self._new_queue()
        self._queues.append(queue)
        ahead: tuple[Job, Settle | Ready] | None = None
        started: asyncio.Future[Settle] | None = None  # ahead's send, already begun
        while not self.stopping or started is not None:
            prepared: Settle | Ready | None = None
            sending, started = started, None
            if ahead is not None:
                (job, prepared), ahead = ahead, None
            else:
                reserved = await self._reserve(queue, index)
                if reserved is None:
                    continue
                job = reserved
            try:
                if sending is None:
                    if prepared is None:
                        prepared = await self.delivery.prepare(job, queue)
                    if isinstance(prepared, Ready):
                        sending = asyncio.ensure_future(self.delivery.deliver(prepared))
                if sending is not None:
                    try:
                        if not self.stopping:
                            ahead = await self._prefetch(queue)
                    except asyncio.CancelledError:
                        sending.cancel()
                        raise
                    settle = await sending
                else:
                    assert isinstance(prepared, Settle)
                    settle = prepared
                if (
                    settle.recording is not None
                    and ahead is not None
                    and isinstance(ahead[1], Ready)
                    and not self.stopping
                ):
                    started = asyncio.ensure_future(self.delivery.deliver(ahead[1]))
                await self.delivery.settle(job, queue, settle)
                self.processed += 1
                self.meter.add()
            except (PyMongoError, MailerError, OSError) as exc:
                # MongoDB away, or the job vanished: leave the jobs to beanstalkd (the closed
                # connection releases them; a live claim makes them wait out its lease)
                # rather than guess; nothing is deleted unrecorded.
                self._warn_settle(f"job {job.id} not settled ({type(exc).__name__}: {exc}); pausing")
                if started is not None and ahead is not None:
                    # Already with its vendor: it finishes and records itself; its job comes
                    # back (the connection closes) and then finds the mail finished.
                    detached_job = ahead[0]
                    self._inflight.pop(detached_job.id, None)
                    self._detached.add(started)
                    started.add_done_callback(self._detached.discard)
                    started.add_done_callback(functools.partial(self._forget, detached_job))
                    started = None
                elif ahead is not None:
                    await self._drop_claim(*ahead)
                ahead = None
                self.delivery.claimer.forget(job)  # its claim is left to run out (or be ours again)
                await queue.close()
                await self._pause(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.delivery.claimer.forget(job)
                await self._bury_unexpected(queue, job)
                await self._pause(1.0)
            finally:
                self._inflight.pop(job.id, None)
        if ahead is not None:
            await self._put_back(queue, *ahead)
        await queue.close()

    def _forget(self, job: Job, _: object = None) -> None:
        self.delivery.claimer.forget(job)

    async def _drop_claim(self, job: Job, prepared: Settle | Ready) -> None:
        """Give up a prefetched job after a failure: its mail goes back to ``queued`` (so the
        requeue sweep finds it at once if beanstalkd lost the job); the job itself is
        released when its connection closes."""
        self._inflight.pop(job.id, None)
        try:
            await self.delivery.hand_back(job)
        except PyMongoError as exc:  # the lease runs out with the TTR instead
            log.warning("could not release the claim of job %s: %s", job.id, type(exc).__name__)

    async def _put_back(self, queue: Beanstalk, job: Job, prepared: Settle | Ready) -> None:
        """On stop, a prefetched job: settle it if that needs no send, else hand it back."""
        try:
            if isinstance(prepared, Ready):
                await self._hand_back([self._inflight[job.id]])
            else:
                await self.delivery.settle(job, queue, prepared)
        except (MailerError, PyMongoError, OSError) as exc:
            log.warning("could not put back job %s: %s", job.id, exc)
        finally:
            self._inflight.pop(job.id, None)

    async def _sweep_loop(self) -> None:
        """The reconciler, run every ``requeue_interval_s`` (first soon after start, so a
        consumer started after a beanstalkd loss recovers its mails quickly)."""
        c = self.settings.consumer
        queue = self._new_queue()
        self._queues.append(queue)
        wait = min(c.requeue_interval_s, 10.0)
        while True:
            await asyncio.sleep(wait)
            wait = c.requeue_interval_s
            try:
                if not queue.connected:
                    await queue.close()
                    await queue.connect()
                await sweep(self.settings, self.store, queue, older_than_s=c.requeue_older_than_s)
            except (MailerError, PyMongoError, OSError) as exc:
                log.warning("requeue sweep failed (%s); next in %.0f s", exc, wait)

    def _warn_settle(self, message: str) -> None:
        """One line per few seconds, not one per loop: 50 loops hitting a MongoDB outage at
        once would otherwise bury the log."""
        now = time.monotonic()
        self._suppressed += 1
        if now - self._last_warning >= 5.0:
            more = f" (and {self._suppressed - 1} more like it)" if self._suppressed > 1 else ""
            log.warning("%s%s", message, more)
            self._last_warning, self._suppressed = now, 0

    async def _keepalive(self) -> None:
        """Touch jobs (and extend their claims) whose delivery runs long, so the TTR never
        hands a mail still being delivered to another consumer.

        Nothing here waits on a slow server: each touch goes out in a task of its own (on the
        job's own connection), and all the leases of a round are extended in one MongoDB
        update, skipped while the previous one is still running. (One touch and one update
        per job, awaited in turn, fell behind under load: 500 deliveries in flight with a 3 s
        TTR meant 500 updates a second, and jobs whose TTR and lease ran out mid-delivery.)
        """
        ttr = float(self.settings.beanstalkd.ttr_s)
        every = max(0.5, ttr / 3)
        lease_task: asyncio.Task[None] | None = None
        while True:
            await asyncio.sleep(every / 2)
            now = time.monotonic()
            due = [(i, item) for i, item in self._inflight.items() if now - item.touched >= every]
            if not due:
                continue
            for index, item in due:
                item.touched = now
                self._spawn(self._touch(index, item))
            if lease_task is None or lease_task.done():
                oids = [oid for _, item in due if (oid := parse_mail_id(item.job.body)) is not None]
                if oids:
                    lease_task = self._spawn(self._extend_leases(oids, ttr))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._extending.add(task)
        task.add_done_callback(self._extending.discard)
        return task

    async def _touch(self, index: int, item: _InFlight) -> None:
        try:
            await item.queue.touch(item.job.id)
        except (MailerError, OSError) as exc:
            if self._inflight.get(index) is item:  # not merely finished meanwhile
                log.warning("could not touch job %s: %s", item.job.id, exc)

    async def _extend_leases(self, oids: list[ObjectId], ttr: float) -> None:
        try:
            await self.store.extend_leases(oids, self.consumer_id, ttr)
        except PyMongoError as exc:
            log.warning("could not extend %d claim lease(s): %s", len(oids), type(exc).__name__)


# --- command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # The shared edge helpers live in mailer.cli (imported here, not at the top, so that
    # importing the Consumer class does not load the operations CLI).
    from mailer.cli import CommandParser, add_version, count

    p = CommandParser(
        prog="mailer-consumer",
        description="Deliver queued mails: N concurrent reserve loops take ids from the tube and send "
        "each mail through the vendors (simulated unless MAILER_ENV=production). SIGINT/SIGTERM "
        "stop it gracefully (in-flight mails get consumer.grace_s); a second signal exits at once.",
    )
    add_version(p)
    p.add_argument(
        "-c",
        "--concurrency",
        type=count(1),
        default=None,
        metavar="N",
        help="reserve loops, at least 1 (default: consumer.concurrency)",
    )
    p.add_argument(
        "--test", action="store_true", help="use the [test] tube and collections (as the load test does)"
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="configuration file (default: $MAILER_CONFIG, else ./mailer.toml if present)",
    )
    p.add_argument(
        "-l",
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR, any case (default: INFO)",
    )
    p.add_argument(
        "--debug-third-party",
        action="store_true",
        help="let client libraries log at DEBUG too; they print credentials: only with throwaway keys",
    )
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (pip install 'mailer[fast]')")
    return p


async def _serve(settings: Settings, concurrency: int | None) -> int:
    consumer = Consumer(settings, concurrency=concurrency)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting at once")
            os._exit(130)
        log.info("%s received: shutting down (send it again to exit at once)", signal.Signals(signum).name)
        consumer.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    async with consumer:
        mode = (
            "production (real vendors)"
            if settings.production
            else f"simulated vendors (MAILER_ENV={settings.env}: nothing is sent)"
        )
        log.info(
            "consumer %s: tube %r, collection %r, %d loops, %s: %s",
            consumer.consumer_id,
            settings.beanstalkd.tube,
            settings.mongodb.collection,
            consumer.concurrency,
            mode,
            ", ".join(v.name for v in consumer.registry.vendors),
        )
        await consumer.run()
    log.info("consumer stopped after %d jobs", consumer.processed)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from mailer.cli import parse_args, run_guarded
    from mailer.logs import setup_logging

    args = parse_args(_parser(), argv)
    if isinstance(args, int):
        return args
    setup_logging(args.log_level, debug_third_party=args.debug_third_party)

    def start() -> int:
        # Inside run_guarded: a bad configuration, MongoDB URI or credentials, an unreachable
        # server, production without vendors, each ends as one line and its exit code.
        settings = load_settings(args.config, test=args.test)
        if args.uvloop:
            try:
                import uvloop
            except ImportError:
                log.warning("--uvloop: uvloop is not installed (pip install 'mailer[fast]'); using asyncio")
            else:
                uvloop.install()
        return asyncio.run(_serve(settings, args.concurrency))

    return run_guarded("mailer-consumer", start)


if __name__ == "__main__":
    sys.exit(main())
