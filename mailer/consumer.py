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
import math
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from pymongo.errors import PyMongoError

from mailer.beanstalk import Beanstalk, Job
from mailer.config import Settings, load_settings
from mailer.delivery import Action, Committer, Decision, Delivery, Ready
from mailer.errors import BeanstalkError, ConfigError, MailerError, NotFound, StoreUnavailable, TimedOut
from mailer.fleet import Fleet
from mailer.jobs import OwnedJob
from mailer.lifecycle import AsyncResource, stop_tasks
from mailer.ratelimit import RateLimiter
from mailer.requeue import sweep
from mailer.routing import THROTTLE_PREFIX, Clock, VendorRegistry
from mailer.stalls import StallWatch
from mailer.store import MailStore
from mailer.throughput import ThroughputMeter
from mailer.vendors import Vendor, build_vendors

if TYPE_CHECKING:
    from mailer.metrics import ConsumerMetrics, MetricsServer

log = logging.getLogger("mailer.consumer")


@dataclass(slots=True)
class Prefetched:
    """An owned job with what is known of it: its claim's outcome, and its send once begun."""

    owned: OwnedJob
    prepared: Decision | Ready | None = None
    sending: asyncio.Future[Decision] | None = None
    # Its loop went on without it (parked for a send-rate token, or left to finish alone
    # after an error): its run of sends ends with it.
    on_its_own: bool = False


class Prefetch:
    """A reserve loop's one slot for the next job, reserved and claimed ahead, and the run
    of its sends.

    A loop's sends run back to back in one task: when a send returns with its record under
    way, the task goes straight on to the slot's mail. A task per send would first wake the
    loop and then start a new task, two turns of the event loop before the next mail goes
    to its vendor (1-2 ms each with 50 loops busy, 2-4% of a 100 ms send). Each send's
    decision is its own :class:`Outcome`, and cancelling it cancels that send.
    """

    __slots__ = ("_delivery", "_go_on", "_runs", "item")

    def __init__(self, delivery: Delivery, go_on: Callable[[], bool]) -> None:
        self.item: Prefetched | None = None
        self._delivery = delivery
        self._go_on = go_on  # false once the consumer stops: no new send begins
        self._runs: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    @property
    def sending(self) -> asyncio.Future[Decision] | None:
        return None if self.item is None else self.item.sending

    def fill(self, item: Prefetched | None) -> None:
        assert self.item is None, "the prefetch slot holds one job"
        self.item = item

    def take(self) -> Prefetched | None:
        item, self.item = self.item, None
        return item

    def startable(self) -> Prefetched | None:
        """The prefetched mail if its send may begin now: claimed, ready and not begun."""
        item = self.item
        if item is not None and item.sending is None and isinstance(item.prepared, Ready):
            return item
        return None

    def start(self) -> None:
        """Begin the prefetched mail's send now, if it may begin."""
        if (item := self.startable()) is not None:
            self.send(item)

    def send(self, item: Prefetched) -> asyncio.Future[Decision]:
        """Begin ``item``'s send; the sends that follow it from the slot run in the same task."""
        assert item.sending is None and isinstance(item.prepared, Ready)
        outcome = item.sending = Outcome()
        run = outcome.run = asyncio.get_running_loop().create_task(self._sends(item))
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)
        return outcome

    async def _sends(self, item: Prefetched) -> None:
        while True:
            outcome, ready = item.sending, item.prepared
            assert isinstance(outcome, Outcome) and isinstance(ready, Ready)
            try:
                decision = await self._delivery.deliver(ready)
            except asyncio.CancelledError:
                outcome.run = None  # (this run is ending already)
                outcome.cancel()
                raise
            except Exception as exc:
                if not outcome.done():
                    outcome.set_exception(exc)
                return
            if outcome.done():  # given up as the send ended: its record stands, nothing follows
                return
            outcome.set_result(decision)
            outcome.run = None
            nxt = self.startable()
            if decision.recording is None or item.on_its_own or not self._go_on() or nxt is None:
                return
            nxt.sending = Outcome(asyncio.current_task())
            item = nxt


class Outcome(asyncio.Future[Decision]):
    """A send's decision. Whoever gives up on it (a loop cancelled at shutdown, a parked
    mail's task) cancels the send at once, as cancelling a task of the send's own would: a
    done callback would reach the send a turn later, after a stopping consumer may have
    handed its job back."""

    def __init__(self, run: asyncio.Task[Any] | None = None) -> None:
        super().__init__()
        self.run = run  # the run of sends, while this is its current send

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        if self.run is not None:
            self.run.cancel(msg)
        return True


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
        # Send-rate limits are shared by every consumer process through MongoDB; they keep
        # epoch time of their own (windows must line up across processes), not ``clock``.
        self.limiter = RateLimiter(settings.rate_limits(), store=self.store)
        self.registry = VendorRegistry(
            list(vendors) if vendors is not None else build_vendors(settings),
            store=self.store,
            cooldown_s=c.vendor_cooldown_s,
            refresh_s=c.registry_refresh_s,
            clock=clock,
            limiter=self.limiter,
        )
        self.committer = Committer(self.store, batch=c.commit_batch)
        self.stalls = StallWatch()
        self.metrics = self._new_metrics()
        self.delivery = Delivery(
            settings,
            self.store,
            self.registry,
            self.committer,
            consumer_id=self.consumer_id,
            clock=clock,
            stalls=self.stalls,
            limiter=self.limiter,
            metrics=self.metrics,
        )
        self.meter = ThroughputMeter("Consumer", settings.throughput_interval_s)
        self.processed = 0
        self._stopping = asyncio.Event()
        self._inflight: dict[int, OwnedJob] = {}  # every job a loop owns now, by job id
        self._failures: dict[int, int] = {}  # consecutive beanstalkd errors, by loop
        self._detached: set[asyncio.Future[Decision]] = set()  # sends whose loop hit an error
        # Mails waiting for a send-rate token, finished by a task each so that their loops
        # go on with other vendors' mails meanwhile (bounded: past it, loops wait with them).
        self._parked: dict[asyncio.Task[None], Prefetched] = {}
        self.max_parked = 10_000  # a safety bound: delivery already bounds the waiting per vendor
        self._loops: list[asyncio.Task[None]] = []
        self._queues: list[Beanstalk] = []
        self._background: list[asyncio.Task[None]] = []
        self._extending: set[asyncio.Task[None]] = set()
        self._last_warning = -1e9
        self._suppressed = 0
        self._outage: dict[int, str] = {}  # servers unreachable since this was logged, by number
        self._servers = settings.beanstalkd.addresses()
        self.started = time.time()
        self._answered: dict[str, float] = {}  # server -> monotonic time it last answered the heartbeat
        self._metrics_server: MetricsServer | None = None

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
        await self.limiter.start()
        await self.registry.start()

    async def close(self) -> None:
        await self._stop_monitoring()
        await stop_tasks([*self._background, *self._extending])
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
        await self._start_monitoring()
        self._background.append(loop.create_task(self._keepalive()))
        if self.settings.consumer.requeue_interval_s > 0:
            self._background.append(loop.create_task(self._sweep_loop()))
        # At least one loop per server, so that every server's jobs are reserved.
        loops = max(self.concurrency, len(self._servers))
        self._loops = [loop.create_task(self._reserve_loop(i)) for i in range(loops)]
        await self._stopping.wait()
        await self._unpark_waiting()
        grace = self.settings.consumer.grace_s
        log.info("stopping: no new jobs; waiting up to %.0f s for %d in flight", grace, len(self._inflight))
        tasks = [*self._loops, *self._parked]
        done, pending = await asyncio.wait(tasks, timeout=grace) if tasks else (set(), set())
        if pending and self.delivery.sending():
            done, pending = await self._await_sends(done, pending)
        if pending:
            log.warning("grace period over: handing back %d unfinished deliveries", len(self._inflight))
            unfinished = list(self._inflight.values())
            # Until every one has ended (a loop that lost its cancel is cancelled again): a
            # job is handed back only once nothing of this process can still record it.
            await stop_tasks(pending, within=math.inf)
            await self._hand_back(unfinished)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("a reserve loop ended with an error", exc_info=task.exception())

    # --- heartbeat, metrics and health ------------------------------------------------

    def _new_metrics(self) -> ConsumerMetrics | None:
        """Metrics only when served: prometheus_client is an extra, imported here only."""
        if not self.settings.consumer.metrics_port:
            return None
        try:
            from mailer.metrics import ConsumerMetrics
        except ImportError:  # pragma: no cover - the extra is in dev
            raise ConfigError(
                "consumer.metrics_port needs prometheus-client: pip install 'mailer[metrics]'"
            ) from None
        metrics = ConsumerMetrics()
        metrics.watch(in_flight=lambda: self.delivery.sending(), breakers=self._breaker_states)
        return metrics

    def _breaker_states(self) -> dict[str, int]:
        from mailer.metrics import breaker_state

        now = self.registry.clock()
        return {
            name: breaker_state(until, reason, now, throttle_prefix=THROTTLE_PREFIX)
            for name, (until, reason) in self.registry.snapshot().items()
        }

    async def _start_monitoring(self) -> None:
        """The heartbeat (always: 'mailer check' counts live consumers by it) and, when a
        metrics port is set, the /metrics and /healthz server."""
        now = time.monotonic()
        self._answered = {"MongoDB": now} | ({"beanstalkd": now} if self.metrics is not None else {})
        self._background.append(asyncio.get_running_loop().create_task(self._heartbeat()))
        if self.metrics is None:
            return
        from mailer.metrics import MetricsServer

        c = self.settings.consumer
        server = MetricsServer(c.metrics_host, c.metrics_port, self.metrics.scrape, self.health)
        try:
            await server.start()
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {c.metrics_host}:{c.metrics_port} ({exc.strerror or exc}): "
                "choose another --metrics-port / consumer.metrics_port, or stop what holds it"
            ) from None
        self._metrics_server = server

    async def _stop_monitoring(self) -> None:
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            await server.close()
        if self._answered:  # the heartbeat ran: say we are gone rather than look alive a while
            with contextlib.suppress(PyMongoError, MailerError):
                await self.store.drop_heartbeat(self.consumer_id)

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics is served on (the real one when 0 meant any), or None."""
        return None if self._metrics_server is None else self._metrics_server.port

    def health(self) -> str | None:
        """None while the loops run and both servers answered lately; else what is wrong."""
        from mailer.metrics import health_problem

        running = bool(self._loops) and not self.stopping and not all(t.done() for t in self._loops)
        within = 3 * self.settings.consumer.heartbeat_s
        return health_problem(
            loops_running=running, answered=self._answered, now=time.monotonic(), within_s=within
        )

    async def _heartbeat(self) -> None:
        """Every ``heartbeat_s``: upsert this consumer's heartbeat and, with metrics, poll the
        tube's job counts (once per interval, whatever the scrape rate)."""
        queue = self._new_fleet() if self.metrics is not None else None
        while True:
            await self._beat()
            if queue is not None:
                await self._poll_queue(queue)
            await asyncio.sleep(self.settings.consumer.heartbeat_s)

    async def _beat(self) -> None:
        try:
            await self.store.heartbeat(
                self.consumer_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                tube=self.settings.beanstalkd.tube,
                started=self.started,
            )
        except (PyMongoError, MailerError) as exc:
            log.warning("heartbeat not written (%s); MongoDB may be unreachable", type(exc).__name__)
            return
        self._answered["MongoDB"] = time.monotonic()

    async def _poll_queue(self, queue: Fleet) -> None:
        """The tube's job counts summed over every server that answers."""
        assert self.metrics is not None
        try:
            try:
                stats: dict[str, Any] = await queue.stats_tube(self.settings.beanstalkd.tube)
            except NotFound:  # no job and no watcher yet: an empty tube
                stats = {}
        except (MailerError, OSError) as exc:
            log.warning("queue depth not polled (%s)", exc)
            return
        self.metrics.queue_depth(stats)
        self._answered["beanstalkd"] = time.monotonic()

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

    async def _hand_back(self, unfinished: list[OwnedJob]) -> None:
        for owned in unfinished:
            try:
                await owned.hand_back()
            except (MailerError, PyMongoError, OSError) as exc:
                # Closing the connection releases the job anyway; the claim runs out with TTR.
                log.warning("could not hand back job %s cleanly: %s", owned.id, exc)

    # --- the loops ---------------------------------------------------------------------

    def _new_queue(self, server: int) -> Beanstalk:
        b = self.settings.beanstalkd
        host, port = self._servers[server]
        return Beanstalk(host, port, connect_timeout=b.connect_timeout_s, command_timeout=b.command_timeout_s)

    def _new_fleet(self) -> Fleet:
        """Every server, for the sweep and the queue depth; closed with the loops' queues."""
        fleet = Fleet.from_settings(self.settings.beanstalkd)
        self._queues.extend(fleet.servers)
        return fleet

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

    def _own(self, job: Job, queue: Beanstalk, server: int) -> OwnedJob:
        """Own a job reserved on ``server``; kept by its fleet job id (ids are per server)."""
        owned = OwnedJob(job, queue, self.delivery, server=server)
        self._inflight[owned.id] = owned
        return owned

    def _release_ownership(self, owned: OwnedJob) -> None:
        self._inflight.pop(owned.id, None)

    async def _reserve(self, queue: Beanstalk, index: int, server: int) -> OwnedJob | None:
        """The next job, or None after a timeout or a (logged, backed-off) connection error."""
        try:
            if not queue.connected:
                await queue.close()
                await self._open(queue)
            job = await queue.reserve(self.settings.consumer.reserve_timeout_s)
        except TimedOut:
            self._reachable(server)
            return None
        except BeanstalkError as exc:
            failures = self._failures[index] = self._failures.get(index, 0) + 1
            pause = min(30.0, 0.5 * 2 ** min(failures, 6))
            if server not in self._outage:  # one line per outage, not one per loop
                self._outage[server] = str(exc)
                host, port = self._servers[server]
                log.warning(
                    "beanstalkd unavailable at %s:%d (%s); its loops retry with back-off (up to 30 s)",
                    host,
                    port,
                    exc,
                )
            await queue.close()
            await self._pause(pause)
            return None
        self._failures[index] = 0
        self._reachable(server)
        return self._own(job, queue, server)

    def _reachable(self, server: int) -> None:
        """``server`` answered: its loops' back-off ends (the other servers' loops keep theirs)."""
        if self._outage.pop(server, None) is not None:
            host, port = self._servers[server]
            log.warning("beanstalkd at %s:%d is reachable again", host, port)
        n = len(self._servers)
        for index in [i for i in self._failures if i % n == server]:
            del self._failures[index]

    async def _prefetch(self, queue: Beanstalk, server: int) -> Prefetched | None:
        """While a mail is with its vendor, reserve and claim the next one if it is ready
        now: the claim's round trips then overlap the send instead of following it."""
        try:
            job = await queue.reserve(0)
        except BeanstalkError:  # none ready (TIMED_OUT), or the connection: the main path sees it
            return None
        owned = self._own(job, queue, server)
        try:
            return Prefetched(owned, await owned.prepare())
        except (PyMongoError, MailerError, OSError) as exc:
            self._release_ownership(owned)
            self._warn_settle(f"job {job.id} not claimed ({type(exc).__name__}: {exc}); released")
            owned.drop()
            with contextlib.suppress(MailerError, OSError):
                await queue.release(job.id, priority=owned.priority, delay=1)
            return None
        except Exception:
            self._release_ownership(owned)
            await self._bury_unexpected(owned)
            return None

    async def _bury_unexpected(self, owned: OwnedJob) -> None:
        """A bug, or data no check foresaw: released, the job would come straight back and
        fail again forever. Bury it; 'mailer kick' returns it once fixed."""
        log.exception("unexpected error on job %s; burying it", owned.id)
        try:
            await owned.finish(Decision(Action.BURY, reason="unexpected error", priority=owned.priority))
        except (MailerError, OSError):
            owned.drop()
            await owned.queue.close()

    async def _reserve_loop(self, index: int) -> None:
        """Reserve -> deliver -> finish, one send at a time per loop, with a one-slot
        :class:`Prefetch`: the next job is reserved and claimed while the current mail is with
        its vendor, and its send starts while the current one's record is being written."""
        server = index % len(self._servers)  # the loops are spread round robin over the servers
        queue = self._new_queue(server)
        self._queues.append(queue)
        ahead = Prefetch(self.delivery, lambda: not self.stopping)
        while not self.stopping or ahead.sending is not None:
            current = ahead.take()
            if current is None:
                owned = await self._reserve(queue, index, server)
                if owned is None:
                    continue
                current = Prefetched(owned)
            decision: Decision | None = None
            try:
                decision = await self._deliver(current, queue, server, ahead)
                if decision is None:  # waits for a send-rate token: its own task finishes it
                    continue
                if decision.recording is not None and not self.stopping:
                    ahead.start()  # the next send overlaps this record (if its run did not begin it)
                await current.owned.finish(decision)
                self.processed += 1
                self.meter.add()
            except (PyMongoError, MailerError, OSError) as exc:
                # MongoDB away, or the job vanished: leave the jobs to beanstalkd (the closed
                # connection releases them; a live claim makes them wait out its lease, or
                # this consumer takes its own back) rather than guess; nothing is deleted
                # unrecorded.
                self._warn_settle(
                    f"job {current.owned.id} not settled ({type(exc).__name__}: {exc}); pausing"
                )
                current.owned.drop()
                await self._drop_ahead(ahead)
                await queue.close()
                await self._pause(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                await self._bury_unexpected(current.owned)
                await self._pause(1.0)
            finally:
                if decision is not None:  # (a parked job stays owned, and touched, till its task ends)
                    self._release_ownership(current.owned)
        await self._put_back(ahead)
        await queue.close()

    async def _deliver(
        self, current: Prefetched, queue: Beanstalk, server: int, ahead: Prefetch
    ) -> Decision | None:
        """The current job's decision; its send (begun already, or begun here) overlaps the
        prefetch of the next job. None when the send waits for a send-rate token and was
        parked: a task of its own finishes it, and the loop goes on."""
        if current.sending is None:
            if current.prepared is None:
                current.prepared = await current.owned.prepare()
            if isinstance(current.prepared, Ready):
                ahead.send(current)
        if current.sending is None:
            assert isinstance(current.prepared, Decision)
            return current.prepared
        try:
            if not self.stopping:
                ahead.fill(await self._prefetch(queue, server))
            if (
                isinstance(current.prepared, Ready)
                and self.limiter.active
                and len(self._parked) < self.max_parked
            ):
                waiting: asyncio.Future[Any] = asyncio.ensure_future(current.prepared.waiting.wait())
                sending: asyncio.Future[Any] = current.sending
                try:
                    await asyncio.wait({sending, waiting}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiting.cancel()
                if not current.sending.done():
                    self._park(current)
                    return None
        except asyncio.CancelledError:
            current.sending.cancel()
            raise
        return await current.sending

    def _park(self, item: Prefetched) -> None:
        item.on_its_own = True
        task = asyncio.get_running_loop().create_task(self._finish_parked(item))
        self._parked[task] = item
        task.add_done_callback(self._unpark)

    def _unpark(self, task: asyncio.Task[None]) -> None:
        self._parked.pop(task, None)

    async def _finish_parked(self, item: Prefetched) -> None:
        """A parked mail: its send, then its job's fate, as its loop would have done."""
        assert item.sending is not None
        try:
            decision = await item.sending
            await item.owned.finish(decision)
            self.processed += 1
            self.meter.add()
        except (PyMongoError, MailerError, OSError) as exc:
            # Its job stays reserved until its TTR runs out (no touch: it is no longer in
            # flight), then comes back; its claim is this consumer's to take back.
            self._warn_settle(f"job {item.owned.id} not settled ({type(exc).__name__}: {exc})")
            item.owned.drop()
        except Exception:
            await self._bury_unexpected(item.owned)
        finally:
            self._release_ownership(item.owned)

    async def _unpark_waiting(self) -> None:
        """On stop: a parked mail still waiting for its token is handed back unsent."""
        waiting = [(t, item) for t, item in self._parked.items() if not item.owned.at_vendor()]
        if waiting:
            await stop_tasks([t for t, _ in waiting], within=math.inf)
            await self._hand_back([item.owned for _, item in waiting])

    async def _drop_ahead(self, ahead: Prefetch) -> None:
        """After a failure on the loop's connection: a prefetched job whose send already
        began finishes and records itself (its job comes back when the connection closes and
        finds the mail finished); one not yet sent gives its claim back."""
        item = ahead.take()
        if item is None:
            return
        self._release_ownership(item.owned)
        if item.sending is not None:
            item.on_its_own = True
            self._detached.add(item.sending)
            item.sending.add_done_callback(self._detached.discard)
            item.sending.add_done_callback(functools.partial(self._drop_when_done, item.owned))
            return
        try:
            await self.delivery.hand_back(item.owned.job)
        except PyMongoError as exc:  # the lease runs out with the TTR instead
            log.warning("could not release the claim of job %s: %s", item.owned.id, type(exc).__name__)

    @staticmethod
    def _drop_when_done(owned: OwnedJob, _: object = None) -> None:
        owned.drop()

    async def _put_back(self, ahead: Prefetch) -> None:
        """On stop, a prefetched job: finish it if that needs no send, else hand it back."""
        item = ahead.take()
        if item is None:
            return
        try:
            if isinstance(item.prepared, Decision):
                await item.owned.finish(item.prepared)
            else:
                await item.owned.hand_back()
        except (MailerError, PyMongoError, OSError) as exc:
            log.warning("could not put back job %s: %s", item.owned.id, exc)
        finally:
            self._release_ownership(item.owned)

    async def _sweep_loop(self) -> None:
        """The reconciler, run every ``requeue_interval_s`` (first soon after start, so a
        consumer started after a beanstalkd loss recovers its mails quickly)."""
        c = self.settings.consumer
        queue = self._new_fleet()
        wait = min(c.requeue_interval_s, 10.0)
        while True:
            await asyncio.sleep(wait)
            wait = c.requeue_interval_s
            try:
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
            due = [owned for owned in self._inflight.values() if now - owned.touched >= every]
            if not due:
                continue
            for owned in due:
                owned.touched = now
                self._spawn(self._touch(owned))
            if lease_task is None or lease_task.done():
                oids = [owned.oid for owned in due if owned.oid is not None]
                if oids:
                    lease_task = self._spawn(self._extend_leases(oids, ttr))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._extending.add(task)
        task.add_done_callback(self._extending.discard)
        return task

    async def _touch(self, owned: OwnedJob) -> None:
        try:
            await owned.touch()
        except (MailerError, OSError) as exc:
            if self._inflight.get(owned.id) is owned:  # not merely finished meanwhile
                log.warning("could not touch job %s: %s", owned.id, exc)

    async def _extend_leases(self, oids: list[ObjectId], ttr: float) -> None:
        try:
            await self.store.extend_leases(oids, self.consumer_id, ttr)
        except PyMongoError as exc:
            log.warning("could not extend %d claim lease(s): %s", len(oids), type(exc).__name__)


# --- command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # The shared edge helpers live in mailer.cmdline (imported here, not at the top, so that
    # importing the Consumer class does not load the console scripts' edge).
    from mailer.cmdline import CommandParser, add_logging, add_loop, add_version, count

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
    add_logging(p, third_party="they print credentials: only with throwaway keys")
    p.add_argument(
        "--metrics-port",
        type=count(0),
        default=None,
        metavar="PORT",
        help="serve Prometheus /metrics and /healthz on PORT (default: consumer.metrics_port; 0 off)",
    )
    # uvloop: about 9% less CPU per delivered mail here (the drain's rate is bound by MongoDB)
    add_loop(p)
    p.add_argument(
        "--uvloop", dest="loop", action="store_const", const="uvloop", help="the same as --loop uvloop"
    )
    return p


async def _serve(settings: Settings, concurrency: int | None) -> int:
    from mailer.cmdline import freeze_startup_heap

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
        freeze_startup_heap()
        await consumer.run()
    log.info("consumer stopped after %d jobs", consumer.processed)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from mailer.cmdline import loop_factory, parse_args, run_guarded
    from mailer.logs import setup_logging

    args = parse_args(_parser(), argv)
    if isinstance(args, int):
        return args
    setup_logging(args.log_level, debug_third_party=args.debug_third_party, fmt=args.log_format)

    def start() -> int:
        # Inside run_guarded: a bad configuration, MongoDB URI or credentials, an unreachable
        # server, production without vendors, each ends as one line and its exit code.
        settings = load_settings(args.config, test=args.test)
        if args.metrics_port is not None:
            consumer = settings.consumer.model_copy(update={"metrics_port": args.metrics_port})
            settings = settings.model_copy(update={"consumer": consumer})
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            return runner.run(_serve(settings, args.concurrency))

    return run_guarded("mailer-consumer", start)


if __name__ == "__main__":
    sys.exit(main())
