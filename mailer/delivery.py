"""Handling one job end to end: claim, route, send, record, then settle the job.

The order is what keeps mails safe: the MongoDB record is written (and acknowledged)
*before* the job is deleted, released or buried, so a crash between the two never loses a
record; at worst the job comes back and the claim sees a finished mail and sends nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from bson import ObjectId
from pydantic import ValidationError

from mailer.beanstalk import Beanstalk, Job
from mailer.config import Settings
from mailer.errors import (
    PermanentVendorError,
    TransientVendorError,
    VendorAuthError,
    VendorError,
)
from mailer.models import Attempt, Email, Outcome, Status
from mailer.routing import VendorRegistry
from mailer.store import ClaimState, Doc, Finish, MailStore, attempt_doc, parse_mail_id

log = logging.getLogger("mailer.delivery")


class Action(Enum):
    DELETE = "delete"
    RELEASE = "release"
    BURY = "bury"


@dataclass(frozen=True, slots=True)
class Settle:
    action: Action
    delay: int = 0
    reason: str = ""
    priority: int = 1024


class Committer:
    """Group commit: many deliveries' final updates go to MongoDB in one ``bulk_write``.

    A caller's ``commit`` returns only once its update is acknowledged, so it may then
    delete its job. A batch is written when ``batch`` updates are waiting or ``interval_s``
    after the first one arrived, whichever comes first.
    """

    def __init__(self, store: MailStore, *, batch: int = 200, interval_s: float = 0.005) -> None:
        self.store = store
        self.batch = batch
        self.interval_s = interval_s
        self._buffer: list[tuple[Finish, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def commit(self, finish: Finish) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._buffer.append((finish, future))
        if len(self._buffer) >= self.batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.interval_s, self._flush)
        await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._buffer = self._buffer, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._write(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _write(self, batch: list[tuple[Finish, asyncio.Future[None]]]) -> None:
        try:
            await self.store.finish_many(f for f, _ in batch)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        self._flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)


def backoff_delay(rounds: int, base: float, cap: float) -> float:
    """Exponential back-off: base, 2*base, 4*base, ... capped."""
    return float(min(cap, base * 2 ** max(0, rounds - 1)))


class Delivery:
    """Delivers the mails behind jobs; one instance per consumer process, shared by its loops."""

    def __init__(
        self,
        settings: Settings,
        store: MailStore,
        registry: VendorRegistry,
        committer: Committer,
        *,
        consumer_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.committer = committer
        self.consumer_id = consumer_id
        self.clock = clock
        self.lease_s = float(settings.beanstalkd.ttr_s)
        self.on_settled: Callable[[Settle], None] | None = None

    async def handle(self, job: Job, queue: Beanstalk) -> Settle:
        """Process one reserved job and settle it on ``queue`` (the reserving connection)."""
        settle = await self._process(job, queue)
        await self._settle(job, queue, settle)
        if self.on_settled is not None:
            self.on_settled(settle)
        return settle

    async def _settle(self, job: Job, queue: Beanstalk, settle: Settle) -> None:
        if settle.action is Action.DELETE:
            await queue.delete(job.id)
        elif settle.action is Action.RELEASE:
            await queue.release(job.id, priority=settle.priority, delay=settle.delay)
        else:
            await queue.bury(job.id)

    async def _process(self, job: Job, queue: Beanstalk) -> Settle:
        oid = parse_mail_id(job.body)
        if oid is None:
            log.error("job %s: body %r is not a mail id; burying it", job.id, job.body[:60])
            return Settle(Action.BURY, reason="not a mail id")
        claim = await self.store.claim(oid, job_id=job.id, consumer=self.consumer_id, lease_s=self.lease_s)
        if claim.state is ClaimState.MISSING:
            log.error("job %s: no stored mail %s; burying it", job.id, oid)
            return Settle(Action.BURY, reason="no such mail")
        if claim.state is ClaimState.DONE:
            log.info(
                "job %s: mail %s is already %s; deleting the redelivered job",
                job.id,
                oid,
                claim.doc and claim.doc["status"],
            )
            return Settle(Action.DELETE, reason="already finished")
        if claim.state is ClaimState.CORRUPT:
            status = (claim.doc or {}).get("status")
            log.error(
                "job %s: mail %s has status %r, which mailer never writes; burying it", job.id, oid, status
            )
            return Settle(Action.BURY, reason="corrupted status")
        if claim.state is ClaimState.BUSY:
            held = claim.doc or {}
            if held.get("job_id") == job.id:
                # This very job came back while its claim is still leased: its consumer died or
                # lost its beanstalkd connection (a dead connection's jobs are ready again at
                # once). It is the mail's only job: wait out the lease instead of deleting it;
                # then the claim either sees the mail finished or takes the expired lease over.
                wait = max(1, int(float(held.get("lease_until", 0.0)) - time.time() + 1.999))
                log.info("job %s: mail %s is still leased; trying again in %d s", job.id, oid, wait)
                return Settle(Action.RELEASE, delay=wait, reason="leased")
            log.info(
                "job %s: mail %s is being delivered by another consumer; deleting this twin job", job.id, oid
            )
            return Settle(Action.DELETE, reason="twin")
        doc = claim.doc
        assert doc is not None
        try:
            email = Email.from_stored(doc["mail"])
        except (ValidationError, KeyError, TypeError) as exc:
            error = f"stored mail is corrupted and cannot be sent: {str(exc)[:300]}"
            log.error("job %s: mail %s: %s", job.id, oid, error)
            await self.committer.commit(
                Finish(str(oid), Status.FAILED, list(doc.get("attempts") or []), error=error)
            )
            return Settle(Action.BURY, reason="corrupted")
        return await self._deliver(job, oid, doc, email)

    async def _deliver(self, job: Job, oid: ObjectId, doc: Doc, email: Email) -> Settle:
        mail_id = str(oid)
        attempts: list[Doc] = list(doc.get("attempts") or [])
        rounds = int(doc.get("rounds", 1))
        tried = False
        for vendor in self.registry.plan(job.id):
            if not self.registry.begin(vendor):
                continue
            tried = True
            started = dt.datetime.now(dt.UTC)
            try:
                result = await vendor.send(email, mail_id)
            except PermanentVendorError as exc:
                self.registry.released(vendor)
                attempts.append(self._attempt(vendor.name, started, "permanent", job, error=exc.reason))
                await self._commit(
                    Finish(mail_id, Status.FAILED, attempts, vendor=vendor.name, error=exc.reason)
                )
                log.warning("mail %s refused by %s, not retried: %s", mail_id, vendor.name, exc.reason)
                return Settle(Action.DELETE, reason="permanent")
            except (TransientVendorError, VendorAuthError) as exc:
                outcome: Outcome = "auth" if isinstance(exc, VendorAuthError) else "transient"
                if isinstance(exc, TransientVendorError) and exc.ambiguous:
                    # The vendor may have accepted it: failing over may send it twice.
                    outcome = "unknown"
                attempts.append(self._attempt(vendor.name, started, outcome, job, error=exc.reason))
                self.registry.failed(vendor, exc)
                continue
            except asyncio.CancelledError:
                self.registry.released(vendor)
                raise
            except Exception as exc:  # an adapter bug: treat as an ambiguous vendor failure
                log.exception("vendor %s raised an unexpected error for mail %s", vendor.name, mail_id)
                reason = f"unexpected {type(exc).__name__}: {str(exc)[:200]}"
                attempts.append(self._attempt(vendor.name, started, "unknown", job, error=reason))
                self.registry.failed(vendor, VendorError(vendor.name, reason))
                continue
            self.registry.succeeded(vendor)
            attempts.append(self._attempt(vendor.name, started, "sent", job, message_id=result.message_id))
            # Sent: from here on nothing may cancel the record, or the mail would go twice.
            await asyncio.shield(
                self._commit(
                    Finish(mail_id, Status.SENT, attempts, vendor=vendor.name, message_id=result.message_id)
                )
            )
            return Settle(Action.DELETE, reason="sent")
        priority = int(doc.get("priority", self.settings.producer.default_priority))
        return await self._retry_later(job, mail_id, attempts, rounds, tried, priority)

    async def _retry_later(
        self, job: Job, mail_id: str, attempts: list[Doc], rounds: int, tried: bool, priority: int
    ) -> Settle:
        c = self.settings.consumer
        now = self.clock()
        if not tried and self.registry.next_available_at() <= now:
            # Nothing was tried, yet no vendor is in its cooldown: each is half-open with
            # another mail's probe in flight. That says nothing about this mail, so the round
            # does not count; otherwise, after an outage, the mails arriving while the probes
            # run would spend rounds (their last one too) waiting on them, and fail although
            # every vendor is back. Try again in a second.
            await self._commit(
                Finish(
                    mail_id,
                    Status.RETRYING,
                    attempts,
                    error=next((a.get("error") for a in reversed(attempts) if a.get("error")), None),
                    next_attempt_ts=now + 1,
                    extra={"rounds": rounds - 1},
                )
            )
            return Settle(Action.RELEASE, delay=1, reason="probing", priority=priority)
        if not tried:
            now_dt = dt.datetime.now(dt.UTC)
            attempts.append(self._attempt("-", now_dt, "unavailable", job, error="no vendor available"))
        last_error = next((a.get("error") for a in reversed(attempts) if a.get("error")), None)
        if rounds >= c.max_attempts:
            error = f"gave up after {rounds} rounds: {last_error or 'no vendor available'}"
            await self._commit(Finish(mail_id, Status.FAILED, attempts, error=error))
            log.error("mail %s failed: %s", mail_id, error)
            return Settle(Action.BURY, reason="max attempts")
        delay = backoff_delay(rounds, c.backoff_base_s, c.backoff_cap_s)
        # No point coming back before a vendor can take it again.
        delay = min(max(delay, self.registry.next_available_at() - now), max(c.backoff_cap_s, 0.0))
        delay_s = max(0, int(delay + 0.999))
        await self._commit(
            Finish(mail_id, Status.RETRYING, attempts, error=last_error, next_attempt_ts=now + delay_s)
        )
        return Settle(Action.RELEASE, delay=delay_s, reason="retry", priority=priority)

    def _attempt(
        self,
        vendor: str,
        started: dt.datetime,
        outcome: Outcome,
        job: Job,
        *,
        error: str | None = None,
        message_id: str | None = None,
    ) -> Doc:
        record = Attempt(
            vendor=vendor,
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC),
            outcome=outcome,
            error=error,
            message_id=message_id,
            job_id=job.id,
            consumer=self.consumer_id,
        )
        return attempt_doc(record)

    async def _commit(self, finish: Finish) -> None:
        """Write through the group commit; retry while MongoDB is away (bounded by the lease),
        because giving up here would mean sending the mail again later."""
        deadline = time.monotonic() + self.lease_s * 0.8
        pause = 0.2
        while True:
            try:
                await self.committer.commit(finish)
                return
            except Exception as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning(
                    "recording mail %s failed (%s); retrying in %.1f s",
                    finish.mail_id,
                    type(exc).__name__,
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
