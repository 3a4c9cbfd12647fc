"""Delivering the mail behind one job: claim, route, send, record, and decide the job's fate.

Delivery decides; it never touches beanstalkd. It returns a :class:`Decision` (delete,
release at T, bury) that the job's owner (:class:`mailer.jobs.OwnedJob`) carries out, and
only once the decision's record is acknowledged by MongoDB: a crash between the two never
loses a record; at worst the job comes back and the claim sees a finished mail.

A send happens only under a claim that still stands: before a failover send, and before
the first send of a claim that is old or that lived through a stall of this process, the
claim is fenced (its lease renewed by its token); a claim that was taken over meanwhile
sends nothing more.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from bson import ObjectId
from pydantic import ValidationError
from pymongo.errors import PyMongoError

from mailer.batching import Batcher
from mailer.beanstalk import Job
from mailer.claims import Claimer, ClaimState, Held
from mailer.config import Settings
from mailer.errors import (
    PermanentVendorError,
    StoreError,
    TransientVendorError,
    UnsupportedByVendor,
    VendorAuthError,
    VendorThrottled,
)
from mailer.metrics import Tally
from mailer.models import Attempt, Email, Outcome, Status
from mailer.ratelimit import RateLimiter
from mailer.routing import VendorRegistry
from mailer.stalls import StallWatch
from mailer.store import Doc, Finish, MailStore, attempt_doc, parse_mail_id

log = logging.getLogger("mailer.delivery")
# Seconds of sends (at a vendor's rate) that may wait in one process for its rate-limit tokens.
PACE_WAIT_S = 10.0
Clock = Callable[[], float]


class Action(Enum):
    DELETE = "delete"
    RELEASE = "release"
    BURY = "bury"
    # Delete as a twin, unless this very job was reserved before (then it is the mail's only
    # job, back while its claim is still leased): release it with the delay instead.
    TWIN = "twin"


@dataclass(frozen=True, slots=True)
class Decision:
    """What becomes of a job once its record (if any) is written."""

    action: Action
    delay: int = 0
    reason: str = ""
    priority: int = 1024
    vendor: str = ""  # the vendor that sent or refused the mail, or was tried last (the log line)
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
    held: Held
    # Set when the send waits for a rate-limit token: its loop need not wait with it.
    waiting: asyncio.Event = field(default_factory=asyncio.Event)


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


def _last_vendor(attempts: list[Doc]) -> str:
    """The vendor of the latest attempt (``-``: none was tried), for counters and the log."""
    return str(attempts[-1].get("vendor") or "-") if attempts else "-"


def backoff_delay(rounds: int, base: float, cap: float, jitter: float = 0.0) -> float:
    """Exponential back-off: base, 2*base, 4*base, ... capped; ``jitter`` in [0, 1) shortens
    it by up to that fraction, so the mails of one outage do not all come back at once."""
    delay = min(cap, base * 2 ** max(0, rounds - 1))
    return float(delay * (1.0 - 0.2 * jitter))


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
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        stalls: StallWatch | None = None,
        limiter: RateLimiter | None = None,
        rand: Callable[[], float] = random.random,
        metrics: Tally | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Tally()
        self.store = store
        self.registry = registry
        self.committer = committer
        self.consumer_id = consumer_id
        self.clock = clock
        self.monotonic = monotonic
        self.stalls = stalls
        self.limiter = limiter
        self._pace_waiting: collections.Counter[str] = collections.Counter()
        self._pace_turn: dict[str, float] = {}  # monotonic time of the last put-off mail's turn
        self.rand = rand
        self.lease_s = float(settings.beanstalkd.ttr_s)
        self.default_priority = settings.producer.default_priority
        self.claimer = Claimer(
            store,
            consumer_id=consumer_id,
            lease_s=self.lease_s,
            default_priority=self.default_priority,
            batch=settings.consumer.commit_batch,
            clock=clock,
            monotonic=monotonic,
        )
        self._unclaimed_since: float | None = None  # claims have not been taking since then
        self._last_warning = -1e9

    @property
    def held(self) -> dict[ObjectId, Held]:
        return self.claimer.held

    def sending(self) -> int:
        """How many mails are with a vendor right now (a graceful stop waits for them)."""
        return sum(1 for h in self.held.values() if h.sending_since is not None)

    async def hand_back(self, job: Job) -> int:
        """Give back a job that will not be finished here (shutdown, an error in its loop):
        its claim is released so the next consumer takes it at once, and a send that was cut
        off while the vendor had the request is recorded as an ``unknown`` attempt. Returns
        the priority to release the job at (the mail's own)."""
        held = self.claimer.forget(job)
        if held is None:
            return self.default_priority
        if held.interrupted is not None:
            error = "handed back at shutdown while a vendor had the request: it may have been delivered"
            finish = Finish(
                str(held.oid), Status.RETRYING, held.interrupted, error=error, next_attempt_ts=self.clock()
            )
            finish.job_id, finish.consumer, finish.claim = job.id, self.consumer_id, held.token
            await self.store.finish_many([finish])
        else:
            await self.store.release_claim(held.oid, token=held.token)
        return held.priority

    async def deliver(self, ready: Ready) -> Decision:
        """Send a claimed mail (failing over between vendors) and record the outcome."""
        return await self._deliver(ready)

    def forget(self, job: Job) -> None:
        """The job was settled, or left to beanstalkd: its claim is no longer this process's."""
        self.claimer.forget(job)

    async def prepare(self, job: Job) -> Decision | Ready:
        """Claim the job's mail: a :class:`Ready` to deliver, or how to settle the job at once."""
        oid = parse_mail_id(job.body)
        if oid is None:
            log.error("job %s: body %r is not a mail id; burying it", job.id, job.body[:60])
            return Decision(Action.BURY, reason="not a mail id", priority=self.default_priority)
        try:
            claim = await self.claimer.claim(oid, job.id)
        except PyMongoError as exc:
            # Not applied, or applied with the answer lost: either way the job is kept (a
            # claim of ours that we do not hold is taken back when the job returns).
            return self._put_off(job, oid, self.default_priority, f"{type(exc).__name__}: {exc}")
        doc = claim.doc or {}
        priority = int(doc.get("priority", self.default_priority))
        if claim.state is ClaimState.ERROR:
            assert claim.error is not None
            raise claim.error
        if claim.state is ClaimState.MISSING:
            log.error("job %s: no stored mail %s; burying it", job.id, oid)
            return Decision(Action.BURY, reason="no such mail", priority=priority)
        if claim.state is ClaimState.DONE:
            log.info(
                "job %s: mail %s is already %s; deleting the redelivered job", job.id, oid, doc["status"]
            )
            return Decision(Action.DELETE, reason="already finished", priority=priority)
        if claim.state is ClaimState.CORRUPT:
            log.error(
                "job %s: mail %s has status %r, which mailer never writes; burying it",
                job.id,
                oid,
                doc.get("status"),
            )
            return Decision(Action.BURY, reason="corrupted status", priority=priority)
        if claim.state is ClaimState.UNCLAIMED:
            return self._put_off(job, oid, priority, "is MongoDB applying writes? a full disk does this")
        if claim.state is ClaimState.BUSY:
            return self._busy(job, oid, doc, priority)
        self._unclaimed_since = None
        held = self.held[oid]
        try:
            email = Email.from_stored(doc["mail"])
        except (ValidationError, KeyError, TypeError) as exc:
            error = f"stored mail is corrupted and cannot be sent: {str(exc)[:300]}"
            log.error("job %s: mail %s: %s", job.id, oid, error)
            await self._commit(
                job, held, Finish(str(oid), Status.FAILED, list(doc.get("attempts") or []), error=error)
            )
            return Decision(Action.BURY, reason="corrupted", priority=priority)
        return Ready(job, oid, doc, email, held)

    def _put_off(self, job: Job, oid: ObjectId, priority: int, why: str) -> Decision:
        """The mail is claimable but its claim did not take: MongoDB is not applying writes
        (a full disk, an outage), or others keep winning it. Its job may be its only job:
        keep it, and try again later, the later the longer claims have been failing."""
        now = self.monotonic()
        if self._unclaimed_since is None:
            self._unclaimed_since = now
        delay = int(min(30.0, max(1.0, (now - self._unclaimed_since) / 2)))
        if now - self._last_warning >= 5.0:
            self._last_warning = now
            log.warning(
                "job %s: the claim on mail %s did not take (%s); its job is kept and tried again in %d s",
                job.id,
                oid,
                why,
                delay,
            )
        return Decision(Action.RELEASE, delay=delay, reason="claim did not take", priority=priority)

    def _busy(self, job: Job, oid: ObjectId, doc: Doc, priority: int) -> Decision:
        """The mail is claimed under a live lease. A twin job (the requeue sweep's, or a
        producer's retried put) is deleted: the lease holder finishes the mail. But if this
        very job was reserved before, its consumer died or lost beanstalkd (a dead
        connection's jobs are ready again at once): it is the mail's only job, so it waits
        out the lease, then finds the mail finished or takes the expired claim over. Whether
        it was reserved before only its owner can ask beanstalkd (``Action.TWIN``)."""
        mine = self.held.get(oid)
        wait = max(1, int(float(doc.get("lease_until", 0.0)) - self.clock() + 1.999))
        if doc.get("job_id") == job.id or (mine is not None and mine.job_id == job.id):
            log.info("job %s: mail %s is still leased; trying again in %d s", job.id, oid, wait)
            return Decision(Action.RELEASE, delay=wait, reason="leased", priority=priority)
        if mine is not None:  # another of our loops delivers it under another job
            return Decision(Action.DELETE, reason="twin", priority=priority)
        return Decision(Action.TWIN, delay=wait, reason="twin", priority=priority)

    # --- the send ----------------------------------------------------------------------

    async def _paced(self, ready: Ready, vendor: str) -> bool | float:
        """A send-rate token for ``vendor``: True at once when this process holds one, else
        after a bounded wait (its loop is told, so it can go on meanwhile), False if none
        came. When enough mails already wait here (``PACE_WAIT_S`` of sends), the seconds
        after which this one's turn would come instead: its job is put off until then, so
        waiting mails never hold every loop and the other vendors run at full speed."""
        if self.limiter is None or self.limiter.try_acquire(vendor):
            return True
        rate = self.limiter.rate(vendor) or 1.0
        room = max(4, int(rate * PACE_WAIT_S))
        if self._pace_waiting[vendor] >= room:
            now = self.monotonic()
            # Spread the put-off mails over the turns after the waiting room's (bounded, so
            # mails that come back early and are put off again do not push it ever later).
            turn = min(
                max(now + room / rate, self._pace_turn.get(vendor, 0.0)) + 1 / rate, now + 3 * room / rate
            )
            self._pace_turn[vendor] = turn
            return turn - now
        self._pace_waiting[vendor] += 1
        ready.waiting.set()
        try:
            return await self.limiter.acquire(vendor)
        finally:
            self._pace_waiting[vendor] -= 1

    def _stalled(self, since: float) -> float:
        return 0.0 if self.stalls is None else self.stalls.stalled_between(since)

    def _needs_fence(self, held: Held) -> bool:
        """A fresh claim stands; an old one, or one that lived through a stall, may not."""
        return self.monotonic() - held.claimed_at > self.lease_s / 2 or self._stalled(held.claimed_at) > 0

    async def _fence(self, held: Held) -> bool:
        """Renew the lease of our claim by its token; False when it no longer stands."""
        now = self.monotonic()
        try:
            ok = await self.store.renew_claim(held.oid, held.token, self.lease_s, now=self.clock())
        except PyMongoError as exc:
            log.warning(
                "mail %s: cannot check its claim (%s); sending nothing now", held.oid, type(exc).__name__
            )
            return False
        if ok:
            held.claimed_at = now
        return ok

    def _abandon(self, ready: Ready, attempts: list[Doc]) -> Decision:
        tried = ", ".join(
            f"{a['vendor']}: {a['outcome']}" for a in attempts[len(ready.doc.get("attempts") or []) :]
        )
        log.warning(
            "mail %s: our claim no longer stands (its lease ran out, most likely while this process "
            "stood still, and another consumer took it over); sending nothing more%s",
            ready.oid,
            f" (this round: {tried})" if tried else "",
        )
        return Decision(Action.RELEASE, delay=1, reason="claim lost", priority=ready.held.priority)

    async def _deliver(self, ready: Ready) -> Decision:
        job, oid, doc, email, held = ready.job, ready.oid, ready.doc, ready.email, ready.held
        mail_id = str(oid)
        attempts: list[Doc] = list(doc.get("attempts") or [])
        rounds = int(doc.get("rounds", 1))
        tried = False  # a request went to a vendor this round
        failed = False  # ... and failed in a way that counts against the mail's rounds
        for vendor in self.registry.plan(job.id):
            if not self.registry.begin(vendor):
                continue
            paced = await self._paced(ready, vendor.name)
            if paced is not True:
                # No send-rate token: neither a failure of the vendor nor a round of the mail.
                self.registry.released(vendor)
                if paced is False:
                    continue  # none came within the wait: the next vendor may have one
                return await self._not_counted(job, held, mail_id, attempts, rounds, paced, "rate limit")
            if (tried or self._needs_fence(held)) and not await self._fence(held):
                self.registry.released(vendor)
                return self._abandon(ready, attempts)
            started = dt.datetime.now(dt.UTC)
            t0 = held.sending_since = self.monotonic()
            try:
                result = await vendor.send(email, mail_id)
            except UnsupportedByVendor as exc:
                self.metrics.vendor_error(vendor.name, "unsupported")
                self.registry.released(vendor)
                attempts.append(self._attempt(vendor.name, started, "unsupported", job, error=exc.reason))
                continue
            except PermanentVendorError as exc:
                self.metrics.vendor_error(vendor.name, "permanent")
                self.metrics.failed(vendor.name)
                self.registry.released(vendor)
                attempts.append(self._attempt(vendor.name, started, "permanent", job, error=exc.reason))
                await self._commit(
                    job, held, Finish(mail_id, Status.FAILED, attempts, vendor=vendor.name, error=exc.reason)
                )
                log.warning("mail %s refused by %s, not retried: %s", mail_id, vendor.name, exc.reason)
                return Decision(Action.DELETE, reason="permanent", priority=held.priority, vendor=vendor.name)
            except VendorThrottled as exc:
                # Not an outage: the vendor stays in rotation after a short pause, at a lower
                # rate, and the mail fails over (or waits) without losing a round.
                tried = True
                self.metrics.vendor_error(vendor.name, "throttled")
                pause = self.registry.throttled(vendor, exc)
                reason = f"{exc.reason} (throttled: paused {pause:.1f} s)"
                attempts.append(self._attempt(vendor.name, started, "transient", job, error=reason))
                continue
            except (TransientVendorError, VendorAuthError) as exc:
                tried = failed = True
                outcome: Outcome = "auth" if isinstance(exc, VendorAuthError) else "transient"
                if isinstance(exc, TransientVendorError) and exc.ambiguous:
                    # The vendor may have accepted it: failing over may send it twice.
                    outcome = "unknown"
                self.metrics.vendor_error(vendor.name, outcome)
                stalled = self._stalled(t0)
                reason = exc.reason
                if stalled and isinstance(exc, TransientVendorError):
                    # Our own stall timed the request out, not the vendor: keep it available.
                    reason += f" (this process stood still for {stalled:.1f} s during the send)"
                    self.registry.released(vendor)
                else:
                    self.registry.failed(vendor, exc)
                attempts.append(self._attempt(vendor.name, started, outcome, job, error=reason))
                continue
            except asyncio.CancelledError:
                self.registry.released(vendor)
                cut = "cut off at shutdown while the vendor had the request: it may have been delivered"
                held.interrupted = [*attempts, self._attempt(vendor.name, started, "unknown", job, error=cut)]
                raise
            except Exception as exc:  # an adapter bug, or a mail no check foresaw
                tried = failed = True
                self.metrics.vendor_error(vendor.name, "unknown")
                log.exception("vendor %s raised an unexpected error for mail %s", vendor.name, mail_id)
                reason = f"unexpected {type(exc).__name__}: {str(exc)[:200]}"
                attempts.append(self._attempt(vendor.name, started, "unknown", job, error=reason))
                self.registry.unexpected(vendor, mail_id, reason)
                continue
            finally:
                held.sending_since = None
                self.metrics.vendor_call(vendor.name, self.monotonic() - t0)
            self.registry.succeeded(vendor)
            self.metrics.sent(vendor.name, doc.get("created_at"))
            attempts.append(self._attempt(vendor.name, started, "sent", job, message_id=result.message_id))
            # Sent: from here on nothing may cancel the record, or the mail would go twice. It
            # is written in a task of its own; ``settle`` waits for it before the delete.
            recording = asyncio.ensure_future(
                self._commit(
                    job,
                    held,
                    Finish(
                        mail_id,
                        Status.SENT,
                        attempts,
                        vendor=vendor.name,
                        message_id=result.message_id,
                        raw=result.raw,
                    ),
                )
            )
            return Decision(
                Action.DELETE, reason="sent", recording=recording, priority=held.priority, vendor=vendor.name
            )
        refusals = self._refusals(attempts)
        if refusals is not None:
            await self._commit(job, held, Finish(mail_id, Status.FAILED, attempts, error=refusals))
            log.warning("mail %s failed: %s", mail_id, refusals)
            self.metrics.failed(_last_vendor(attempts))
            return Decision(Action.DELETE, reason="unsupported", priority=held.priority)
        return await self._retry_later(job, held, mail_id, attempts, rounds, tried, failed)

    def _refusals(self, attempts: list[Doc]) -> str | None:
        """One reason naming each vendor's refusal, when every enabled vendor said it
        cannot carry this mail (in this round or an earlier one); else None."""
        said = {a["vendor"]: a.get("error") or "" for a in attempts if a.get("outcome") == "unsupported"}
        names = [v.name for v in self.registry.vendors]
        if not all(n in said for n in names):
            return None
        return "no enabled vendor can carry this mail: " + "; ".join(f"{n}: {said[n]}" for n in names)

    async def _retry_later(
        self,
        job: Job,
        held: Held,
        mail_id: str,
        attempts: list[Doc],
        rounds: int,
        tried: bool,
        failed: bool,
    ) -> Decision:
        c = self.settings.consumer
        now = self.clock()
        priority = held.priority
        last_error = next((a.get("error") for a in reversed(attempts) if a.get("error")), None)
        if not failed and (tried or self.registry.next_available_at() <= now):
            # Nothing failed: the vendors throttled us, had no rate-limit token in time, or
            # were half-open with another mail's probe in flight (or said they cannot carry
            # this mail). That says nothing about this mail, so the round does not count;
            # otherwise, after an outage, the mails arriving while the probes run would spend
            # rounds (their last one too) waiting on them, and fail although every vendor is
            # back. Again once the first vendor can take it (at least 1 s).
            wait = min(self.registry.next_available_at() - now, c.backoff_cap_s)
            return await self._not_counted(job, held, mail_id, attempts, rounds, wait, last_error)
        if not tried:
            now_dt = dt.datetime.now(dt.UTC)
            attempts.append(self._attempt("-", now_dt, "unavailable", job, error="no vendor available"))
            last_error = last_error or "no vendor available"
        if rounds >= c.max_attempts:
            error = f"gave up after {rounds} rounds: {last_error or 'no vendor available'}"
            await self._commit(job, held, Finish(mail_id, Status.FAILED, attempts, error=error))
            log.error("mail %s failed: %s", mail_id, error)
            self.metrics.failed(_last_vendor(attempts))
            return Decision(
                Action.BURY, reason="max attempts", priority=priority, vendor=_last_vendor(attempts)
            )
        delay = backoff_delay(rounds, c.backoff_base_s, c.backoff_cap_s, jitter=self.rand())
        # No point coming back before a vendor can take it again.
        delay = min(max(delay, self.registry.next_available_at() - now), max(c.backoff_cap_s, 0.0))
        delay_s = max(0, int(delay + 0.999))
        await self._commit(
            job,
            held,
            Finish(mail_id, Status.RETRYING, attempts, error=last_error, next_attempt_ts=now + delay_s),
        )
        self.metrics.retried(_last_vendor(attempts))
        return Decision(
            Action.RELEASE, delay=delay_s, reason="retry", priority=priority, vendor=_last_vendor(attempts)
        )

    async def _not_counted(
        self,
        job: Job,
        held: Held,
        mail_id: str,
        attempts: list[Doc],
        rounds: int,
        wait: float,
        error: str | None,
    ) -> Decision:
        """Try again in ``wait`` seconds (at least 1) without spending a round of the mail."""
        delay = max(1, int(wait + 0.999))
        finish = Finish(
            mail_id,
            Status.RETRYING,
            attempts,
            error=error,
            next_attempt_ts=self.clock() + delay,
            extra={"rounds": rounds - 1},
        )
        await self._commit(job, held, finish)
        self.metrics.retried(_last_vendor(attempts))
        return Decision(
            Action.RELEASE,
            delay=delay,
            reason="not counted",
            priority=held.priority,
            vendor=_last_vendor(attempts),
        )

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

    async def _commit(self, job: Job, held: Held, finish: Finish) -> None:
        """Write through the group commit; retry while MongoDB is away (bounded by the lease),
        because giving up here would mean sending the mail again later. Only MongoDB's own
        failures are retried: anything else is a bug that retrying would not mend."""
        finish.job_id, finish.consumer, finish.claim = job.id, self.consumer_id, held.token
        deadline = self.monotonic() + self.lease_s * 0.8
        pause = 0.2
        while True:
            try:
                await self.committer.commit(finish)
                return
            except (PyMongoError, StoreError) as exc:
                if self.monotonic() + pause > deadline:
                    raise
                log.warning(
                    "recording mail %s failed (%s); retrying in %.1f s",
                    finish.mail_id,
                    type(exc).__name__,
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
