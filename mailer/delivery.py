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

from mailer.batching import Batcher
from mailer.beanstalk import Beanstalk, Job
from mailer.config import Settings
from mailer.errors import (
    BeanstalkError,
    PermanentVendorError,
    TransientVendorError,
    VendorAuthError,
    VendorError,
)
from mailer.models import Attempt, Email, Outcome, Status
from mailer.routing import VendorRegistry
from mailer.store import Claim, ClaimState, Doc, Finish, MailStore, attempt_doc, parse_mail_id

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
    # A sent mail's record, still being written: the job is settled only once it is done,
    # but the loop may start its next send meanwhile.
    recording: asyncio.Future[None] | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """A claimed mail, ready to be delivered."""

    job: Job
    oid: ObjectId
    doc: Doc
    email: Email


class Committer:
    """Group commit of delivery records: many loops' updates in one ``bulk_write``.

    A caller's ``commit`` returns only once its update is acknowledged, so it may then
    delete its job. Batching is natural (see :mod:`mailer.batching`): no timer, the updates
    that arrive while one write is in flight go together in the next.
    """

    def __init__(self, store: MailStore, *, batch: int = 200) -> None:
        self.store = store
        self._batcher: Batcher[Finish, None] = Batcher(self._write, max_batch=batch)

    async def _write(self, finishes: list[Finish]) -> list[None]:
        await self.store.finish_many(finishes)
        return [None] * len(finishes)

    async def commit(self, finish: Finish) -> None:
        await self._batcher.submit(finish)

    async def close(self) -> None:
        await self._batcher.close(within=self.store.settings.mongodb.timeout_ms / 1000 + 5)


class Claimer:
    """Claims for many loops in one ``update_many`` + ``find`` (see ``MailStore.claim_many``).

    One ``find_one_and_update`` per mail costs the client and nx-27017 several times more
    CPU than a shared claim of the jobs reserved meanwhile.
    """

    def __init__(self, store: MailStore, *, consumer_id: str, lease_s: float, batch: int = 200) -> None:
        self.store = store
        self.consumer_id = consumer_id
        self.lease_s = lease_s
        self._batcher: Batcher[tuple[ObjectId, int], Claim] = Batcher(self._write, max_batch=batch)

    async def _write(self, requests: list[tuple[ObjectId, int]]) -> list[Claim]:
        if len(requests) == 1:  # one round trip instead of two when the load is light
            oid, job_id = requests[0]
            return [
                await self.store.claim(oid, job_id=job_id, consumer=self.consumer_id, lease_s=self.lease_s)
            ]
        return await self.store.claim_many(requests, consumer=self.consumer_id, lease_s=self.lease_s)

    async def claim(self, oid: ObjectId, job_id: int) -> Claim:
        return await self._batcher.submit((oid, job_id))


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
        self.claimer = Claimer(
            store, consumer_id=consumer_id, lease_s=self.lease_s, batch=settings.consumer.commit_batch
        )
        self.on_settled: Callable[[Settle], None] | None = None

    async def handle(self, job: Job, queue: Beanstalk) -> Settle:
        """Process one reserved job and settle it on ``queue`` (the reserving connection)."""
        prepared = await self.prepare(job, queue)
        settle = await self.deliver(prepared) if isinstance(prepared, Ready) else prepared
        await self.settle(job, queue, settle)
        return settle

    async def settle(self, job: Job, queue: Beanstalk, settle: Settle) -> None:
        """Delete, release or bury the job: only after its record was acknowledged."""
        if settle.recording is not None:
            await asyncio.shield(settle.recording)
        if settle.action is Action.DELETE:
            await queue.delete(job.id)
        elif settle.action is Action.RELEASE:
            await queue.release(job.id, priority=settle.priority, delay=settle.delay)
        else:
            await queue.bury(job.id)
        if self.on_settled is not None:
            self.on_settled(settle)

    async def deliver(self, ready: Ready) -> Settle:
        """Send a claimed mail (failing over between vendors) and record the outcome."""
        return await self._deliver(ready.job, ready.oid, ready.doc, ready.email)

    async def prepare(self, job: Job, queue: Beanstalk) -> Settle | Ready:
        """Claim the job's mail: a :class:`Ready` to deliver, or how to settle the job at once."""
        oid = parse_mail_id(job.body)
        if oid is None:
            log.error("job %s: body %r is not a mail id; burying it", job.id, job.body[:60])
            return Settle(Action.BURY, reason="not a mail id")
        claim = await self.claimer.claim(oid, job.id)
        if claim.state is ClaimState.ERROR:
            assert claim.error is not None
            raise claim.error
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
            return await self._busy(job, queue, oid, claim.doc or {})
        doc = claim.doc
        assert doc is not None
        try:
            email = Email.from_stored(doc["mail"])
        except (ValidationError, KeyError, TypeError) as exc:
            error = f"stored mail is corrupted and cannot be sent: {str(exc)[:300]}"
            log.error("job %s: mail %s: %s", job.id, oid, error)
            await self._commit(
                job, Finish(str(oid), Status.FAILED, list(doc.get("attempts") or []), error=error)
            )
            return Settle(Action.BURY, reason="corrupted")
        return Ready(job, oid, doc, email)

    async def _busy(self, job: Job, queue: Beanstalk, oid: ObjectId, held: Doc) -> Settle:
        """The mail is claimed under a live lease. A twin job (the requeue sweep's, or a
        producer's retried put) is deleted: the lease holder finishes the mail. But if this
        very job was reserved before, its consumer died or lost beanstalkd (a dead
        connection's jobs are ready again at once): it is the mail's only job, so it waits
        out the lease, then finds the mail finished or takes the expired claim over."""
        returning = held.get("job_id") == job.id
        if not returning:
            try:
                returning = int((await queue.stats_job(job.id)).get("reserves", 1)) > 1
            except BeanstalkError:
                returning = True  # unsure: keeping a job is harmless, dropping one is not
        if returning:
            wait = max(1, int(float(held.get("lease_until", 0.0)) - time.time() + 1.999))
            log.info("job %s: mail %s is still leased; trying again in %d s", job.id, oid, wait)
            return Settle(Action.RELEASE, delay=wait, reason="leased")
        log.info(
            "job %s: mail %s is being delivered by another consumer; deleting this twin job", job.id, oid
        )
        return Settle(Action.DELETE, reason="twin")

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
                    job, Finish(mail_id, Status.FAILED, attempts, vendor=vendor.name, error=exc.reason)
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
            # Sent: from here on nothing may cancel the record, or the mail would go twice. It
            # is written in a task of its own; ``settle`` waits for it before the delete.
            recording = asyncio.ensure_future(
                self._commit(
                    job,
                    Finish(mail_id, Status.SENT, attempts, vendor=vendor.name, message_id=result.message_id),
                )
            )
            return Settle(Action.DELETE, reason="sent", recording=recording)
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
                job,
                Finish(
                    mail_id,
                    Status.RETRYING,
                    attempts,
                    error=next((a.get("error") for a in reversed(attempts) if a.get("error")), None),
                    next_attempt_ts=now + 1,
                    extra={"rounds": rounds - 1},
                ),
            )
            return Settle(Action.RELEASE, delay=1, reason="probing", priority=priority)
        if not tried:
            now_dt = dt.datetime.now(dt.UTC)
            attempts.append(self._attempt("-", now_dt, "unavailable", job, error="no vendor available"))
        last_error = next((a.get("error") for a in reversed(attempts) if a.get("error")), None)
        if rounds >= c.max_attempts:
            error = f"gave up after {rounds} rounds: {last_error or 'no vendor available'}"
            await self._commit(job, Finish(mail_id, Status.FAILED, attempts, error=error))
            log.error("mail %s failed: %s", mail_id, error)
            return Settle(Action.BURY, reason="max attempts")
        delay = backoff_delay(rounds, c.backoff_base_s, c.backoff_cap_s)
        # No point coming back before a vendor can take it again.
        delay = min(max(delay, self.registry.next_available_at() - now), max(c.backoff_cap_s, 0.0))
        delay_s = max(0, int(delay + 0.999))
        await self._commit(
            job, Finish(mail_id, Status.RETRYING, attempts, error=last_error, next_attempt_ts=now + delay_s)
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

    async def _commit(self, job: Job, finish: Finish) -> None:
        """Write through the group commit; retry while MongoDB is away (bounded by the lease),
        because giving up here would mean sending the mail again later."""
        finish.job_id, finish.consumer = job.id, self.consumer_id
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
