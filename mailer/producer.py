"""The SDK applications use: ``await Producer().send(mail)``.

The path is deliberately short: validate, insert into MongoDB (status ``queued``), put
only the id on the tube. MongoDB comes first so a mail is never queued without its
document; if the put then fails the document stays ``queued`` and the requeue sweep
(``mailer requeue`` or the consumer's own) finds it, so the mail is not lost either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pymongo.errors import PyMongoError

from mailer.batching import Batcher, take
from mailer.capabilities import refuse_uncarriable
from mailer.config import Settings, load_settings
from mailer.errors import (
    BeanstalkError,
    BeanstalkServerError,
    EmailValidationError,
    EnqueueError,
    MailerError,
    MailNotFound,
    ProducerClosedError,
    StoreError,
)
from mailer.events import SuppressionCheck, to_queue
from mailer.fleet import Fleet
from mailer.lifecycle import AsyncResource
from mailer.models import Email, MailRecord, Status, parse_email
from mailer.store import MAX_DOCUMENT_BYTES, RECEIPT_DELAY_S, Doc, MailStore, parse_mail_id
from mailer.suppression_view import SuppressionView
from mailer.throughput import ThroughputMeter

log = logging.getLogger("mailer.producer")
EmailInput = Email | dict[str, Any] | str | bytes
_MAX_BATCH = 1000
# A group commit's documents, in (estimated) bytes: pymongo splits an insert_many at 48 MB
# by itself, but one call still has to finish within mongodb.timeout_ms, so big mails go in
# small batches (a mail bigger than this goes alone) and cannot time out their neighbours.
_MAX_BATCH_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class _Entry:
    """A validated mail on its way: the document to insert and its job's parameters."""

    doc: Doc
    priority: int
    delay: int
    size: int  # estimated bytes as stored, for bounding batches


def _approx_bytes(mail: Email) -> int:
    """The stored size, estimated in O(attachments): exact for attachments (the bulk of any
    big mail), characters for bodies (at most 4x under: UTF-8), a flat allowance for the
    rest. Measuring exactly (BSON-encoding every mail) would double the send path's CPU."""
    size = 2048 + len(mail.text or "") + len(mail.html or "")
    if mail.attachments:  # (no generator for the common mail without any)
        size += sum(len(a.content) for a in mail.attachments)
    return size


def _leader(entries: Sequence[_Entry]) -> int:
    """The index of the mail whose document carries the receipt of the epoch this batch
    opens, if it opens one: the smallest (the receipt must fit beside it), and one with no
    idempotency key if any (it cannot turn out to be someone else's mail and so not be
    stored)."""
    keyless = [i for i, e in enumerate(entries) if "idempotency_key" not in e.doc]
    return min(keyless or range(len(entries)), key=lambda i: entries[i].size)


def _write_failed(exc: Exception) -> StoreError:
    """The error of a write whose outcome is unknown (MongoDB went away mid-write)."""
    if isinstance(exc, StoreError):
        return exc
    return StoreError(
        f"MongoDB failed during the write ({type(exc).__name__}: {exc}); the mail may or may "
        "not be stored: if it is, the requeue sweep queues it"
    )


class _ReceiptStore(Protocol):
    async def record_jobs(self, leader: str, jobs: dict[str, int]) -> None: ...

    async def record_job_ids(self, jobs: dict[str, int]) -> None: ...


class _Epoch:
    """The writes that share one receipt: their documents' ``batch`` names ``leader``."""

    __slots__ = ("closing", "jobs", "leader", "leader_stored", "pending", "written")

    def __init__(self, leader: str, written: asyncio.Future[None]) -> None:
        self.leader = leader
        self.leader_stored = False
        self.jobs: dict[str, int] = {}
        self.pending = 0  # members between their stamp and their put's outcome
        self.closing = False
        self.written = written


class _Receipts:
    """Receipts of sends, group-committed in the background.

    A caller must not pay a second MongoDB write for its receipt (it would double the cost
    of a lone send, and cost a group commit of 50 mails an eighth of its CPU), so
    consecutive writes share an epoch: a lone send's mail, or a group commit's mails
    together, join it before their insert (their documents' ``batch`` names the epoch's
    first mail), and the epoch's receipt is written once, whole, in the background, after
    ``delay`` seconds or as soon as it holds ``max_mails`` mails, and only once no member is
    still between its stamp and its put: a receipt never lacks a member whose job exists.
    ``mailer.requeue`` waits ``RECEIPT_DELAY_S`` longer for it; a receipt lost to a crash
    only costs such a mail one harmless duplicate job.
    """

    def __init__(
        self, store: _ReceiptStore, *, delay: float = RECEIPT_DELAY_S, max_mails: int = _MAX_BATCH
    ) -> None:
        self._store = store
        self._delay = delay
        self._max = max_mails
        self._epoch: _Epoch | None = None
        self._unwritten: set[asyncio.Future[None]] = set()

    def join(self, doc: Doc) -> _Epoch:
        """A lone send's mail joins the open epoch (or opens one, as its leader)."""
        return self.join_all([doc], lambda: 0)[0]

    def join_all(self, docs: Sequence[Doc], leader: Callable[[], int]) -> tuple[_Epoch, int | None]:
        """A group commit's mails join the open epoch together, or open one whose leader is
        ``docs[leader()]`` (the batch's best carrier of the receipt, see :func:`_leader`).
        With the epoch, the leader's index when this batch opened it (it then reports the
        leader's outcome in :meth:`leave_all`)."""
        epoch, opened = self._epoch, None
        if epoch is None or epoch.closing or len(epoch.jobs) + epoch.pending + len(docs) > self._max:
            loop = asyncio.get_running_loop()
            opened = leader()
            epoch = self._epoch = _Epoch(str(docs[opened]["_id"]), loop.create_future())
            self._unwritten.add(epoch.written)
            loop.call_later(self._delay, self._close, epoch)
        epoch.pending += len(docs)
        for doc in docs:
            doc["batch"] = epoch.leader
        if len(epoch.jobs) + epoch.pending >= self._max:
            self._close(epoch)  # full: written as soon as its members are done
        return epoch, opened

    def leave(self, epoch: _Epoch, mail_id: str, *, stored: bool, job: int | None) -> None:
        """A member is done: stored or not, queued (``job``) or not."""
        jobs = {} if job is None else {mail_id: job}
        self.leave_all(epoch, 1, jobs, leader_stored=stored if mail_id == epoch.leader else None)

    def leave_all(
        self, epoch: _Epoch, members: int, jobs: dict[str, int], *, leader_stored: bool | None
    ) -> None:
        """A group commit's ``members`` are done; ``jobs``, the queued ones'; ``leader_stored``
        when the batch holds the epoch's leader (one call per batch, not one per mail)."""
        if leader_stored is not None:
            epoch.leader_stored = leader_stored
        epoch.jobs.update(jobs)
        epoch.pending -= members
        if epoch.closing and epoch.pending == 0:
            self._write(epoch)

    def _close(self, epoch: _Epoch) -> None:
        if epoch.closing:
            return
        epoch.closing = True
        if self._epoch is epoch:
            self._epoch = None
        if epoch.pending == 0:
            self._write(epoch)

    def _write(self, epoch: _Epoch) -> None:
        task = asyncio.get_running_loop().create_task(self._commit(epoch))
        task.add_done_callback(lambda _: self._written(epoch))

    def _written(self, epoch: _Epoch) -> None:
        _settle(epoch.written)
        self._unwritten.discard(epoch.written)  # a written receipt is no longer waited for

    async def _commit(self, epoch: _Epoch) -> None:
        """One update per epoch; on the leader, or per mail if the leader was not stored.
        A failure is logged, not raised: the mails are stored and queued. An empty receipt
        on a stored leader is written too: it tells the sweep at once that none of its mails
        has a job (their puts failed), instead of after the in-flight bound."""
        if not epoch.jobs and not epoch.leader_stored:
            return
        try:
            if epoch.leader_stored:
                await self._store.record_jobs(epoch.leader, epoch.jobs)
            else:
                await self._store.record_job_ids(epoch.jobs)
        except PyMongoError as exc:
            _receipt_lost(len(epoch.jobs), exc)

    async def close(self, within: float) -> None:
        """Write every open receipt now, waiting at most ``within`` seconds."""
        if self._epoch is not None:
            self._close(self._epoch)
        pending = [f for f in self._unwritten if not f.done()]
        self._unwritten = set(pending)
        if pending:
            await asyncio.wait(pending, timeout=within)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _receipt_lost(n: int, exc: Exception) -> None:
    log.warning(
        "could not record the jobs of %d mail(s) (%s); the requeue sweep may queue them twice",
        n,
        type(exc).__name__,
    )


def _copy_error(exc: BaseException) -> MailerError:
    """A fresh exception per waiting caller (one instance raised in many tasks would share
    and grow one traceback)."""
    if isinstance(exc, StoreError):
        return StoreError(str(exc))
    return StoreError(f"the write failed ({type(exc).__name__}: {exc}); the mail may not be stored")


class Producer(AsyncResource):
    """Validates, stores and queues mails. Safe to share between many tasks.

    >>> async with Producer() as producer:
    ...     mail_id = await producer.send({"from": "a@example.com", "to": "b@example.com",
    ...                                     "subject": "Hi", "text": "Hello"})
    """

    def __init__(self, settings: Settings | None = None, *, test: bool = False) -> None:
        settings = settings if settings is not None else load_settings()
        self.settings = settings.for_test() if test else settings
        b = self.settings.beanstalkd
        self.store = MailStore(self.settings, insert_client=True)
        self.queue = Fleet.from_settings(b)  # one or several beanstalkd servers
        self._meter = ThroughputMeter("Producer", self.settings.throughput_interval_s)
        # The list from memory while its view is trusted (see mailer.suppression_view).
        self._suppressions = SuppressionView(self.store, lease_s=self.settings.suppression.lease_s)
        self._suppression = SuppressionCheck(self._suppressions, self.settings.suppression.mode)
        self._sends: Batcher[_Entry, str | MailerError] = Batcher(
            self._screen_store_and_queue,
            max_batch=_MAX_BATCH,
            max_weight=_MAX_BATCH_BYTES,
            weigh=lambda e: e.size,
            on_error=_copy_error,
        )
        self._receipts = _Receipts(self.store)
        # send() calls under way: only a caller that is alone takes the lone path. (Deciding by
        # "is a write in flight right now" split 50 concurrent callers into a lone write, a
        # write of one and a batch, over and over: 3 mails per write instead of ~50.)
        self._calls = 0
        self._connected = False

    def __repr__(self) -> str:
        return f"<Producer tube={self.settings.beanstalkd.tube!r} connected={self._connected}>"

    # --- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        if self._connected:
            return
        await self.store.connect()
        try:
            await self.queue.connect()
            await self.queue.use(self.settings.beanstalkd.tube)
        except BaseException:
            await self.store.close()
            raise
        if self.settings.measure_throughput:
            self._meter.start()
        self._suppressions.start()
        self._connected = True

    async def quit(self) -> None:
        """Close both connections; calls in flight fail. Safe to call twice."""
        self._connected = False
        # Let sends already accepted finish their write (bounded by the store's timeouts).
        within = self.settings.mongodb.timeout_ms / 1000 + 5
        await self._sends.close(within=within)
        await self._receipts.close(within=within)
        await self._suppressions.close()
        await self._meter.stop()
        await self.queue.close()
        await self.store.close()

    close = quit

    def _require(self) -> None:
        if not self._connected:
            raise ProducerClosedError(
                "the producer is not connected: call 'await producer.connect()' "
                "or use 'async with Producer()'"
            )

    # --- sending -----------------------------------------------------------------------

    def validate(self, email: EmailInput) -> Email:
        mail = parse_email(email, max_bytes=self.settings.producer.max_email_bytes)
        return refuse_uncarriable(mail, self.settings)  # what no enabled vendor can carry

    def _priority(self, email: Email) -> int:
        return email.priority if email.priority is not None else self.settings.producer.default_priority

    def _entry(self, mail: Email) -> _Entry:
        """The mail's document, refused here if MongoDB would refuse it (only a mail big
        enough to come near the limit is measured exactly)."""
        priority = self._priority(mail)
        doc = MailStore.new_document(mail, priority=priority)
        size = _approx_bytes(mail)
        if size > MAX_DOCUMENT_BYTES // 4 and (why := MailStore.too_large(doc)) is not None:
            raise StoreError(why)
        return _Entry(doc, priority, mail.delay_seconds(), size)

    async def send(self, email: EmailInput) -> str:
        """Store and queue one mail; return its id (24 hex characters).

        A mail whose ``idempotency_key`` was used before returns the earlier id and queues
        nothing. Raises EmailValidationError (nothing stored), StoreError (not stored, or
        unknown when MongoDB went away mid-write) or EnqueueError (stored, not yet queued:
        the requeue sweep will queue it).

        A lone caller (nobody else is sending) goes straight through: one ``insert_one``,
        one ``put``, and its job's receipt joins a background group commit. Concurrent calls
        are group-committed: while one write is in flight, the mails that arrive wait and go
        together in the next ``insert_many`` and pipelined puts. Each call still returns only
        once its own mail is stored and queued.
        """
        self._require()
        self._calls += 1
        try:
            entry = self._entry(self.validate(email))
            if self._calls > 1 or self._sends.busy:
                result = await self._sends.submit(entry)
                if isinstance(result, MailerError):
                    raise result
                return result
            return await self._send_alone(entry)
        finally:
            self._calls -= 1

    async def _send_alone(self, entry: _Entry) -> str:
        """Insert (acknowledged), then put; the receipt is left to the background."""
        doc = entry.doc
        if (refused := (await self._suppression.screen([doc]))[0]) is not None:
            raise refused
        epoch = self._receipts.join(doc)
        doc["queued_ts"] = time.time()
        mail_id, new, job = str(doc["_id"]), False, None
        try:
            try:
                mail_id, new = await self.store.insert(doc)
            except Exception as exc:
                raise _write_failed(exc) from None
            if not new or not to_queue(doc):
                return mail_id  # the idempotency key's earlier mail, or every recipient suppressed
            try:
                job = await self._put_one(mail_id, entry.priority, entry.delay)
            except BeanstalkError as exc:
                raise EnqueueError([mail_id], exc) from exc
            self._meter.add(1)
            return mail_id
        finally:
            self._receipts.leave(epoch, str(doc["_id"]), stored=new, job=job)

    async def send_many(self, emails: Sequence[EmailInput]) -> list[str]:
        """Store and queue a batch with one ``insert_many`` and pipelined puts.

        Every mail is validated first: one invalid mail rejects the whole batch (its error
        names the index, e.g. ``[3].to``) and nothing is stored. If some mails could not be
        queued, EnqueueError names them (they are stored; the sweep queues them) and its
        ``all_ids`` gives every id in input order.
        """
        self._require()
        entries: list[_Entry] = []
        errors: list[tuple[str, str]] = []
        for i, raw in enumerate(emails):
            try:
                entries.append(self._entry(self.validate(raw)))
            except EmailValidationError as exc:
                errors.extend((f"[{i}].{field}", msg) for field, msg in exc.errors)
        if errors:
            raise EmailValidationError(errors)
        await self._suppression.screen_all([e.doc for e in entries])  # one query; refuses all or drops
        ids: list[str] = []
        refused: list[StoreError] = []
        unqueued: list[EnqueueError] = []
        start = 0
        while start < len(entries):
            n = take(entries[start : start + _MAX_BATCH], _MAX_BATCH_BYTES, lambda e: e.size)
            chunk, start = entries[start : start + n], start + n
            for result in await self._store_and_queue(chunk):
                if isinstance(result, StoreError):
                    refused.append(result)
                elif isinstance(result, EnqueueError):
                    unqueued.append(result)
                    ids.extend(result.mail_ids)
                else:
                    ids.append(str(result))
        if refused:
            raise StoreError(
                f"{len(refused)} mail(s) of the batch refused by MongoDB ({refused[0]}); the other "
                f"{len(ids)} were stored"
            )
        if unqueued:
            cause = unqueued[0].__cause__ or unqueued[0]
            raise EnqueueError([m for e in unqueued for m in e.mail_ids], cause, all_ids=ids)
        return ids

    async def _screen_store_and_queue(self, entries: list[_Entry]) -> list[str | MailerError]:
        """A group commit: the suppression check for the whole batch (one query), then the write
        of the mails it lets through; a refused mail's caller gets its RecipientSuppressed."""
        refused = await self._suppression.screen([e.doc for e in entries])
        kept = [e for e, r in zip(entries, refused, strict=True) if r is None]
        stored = iter(await self._store_and_queue(kept) if kept else [])
        return [r if r is not None else next(stored) for r in refused]

    async def _store_and_queue(self, entries: list[_Entry]) -> list[str | MailerError]:
        """One ``insert_many``, then one pipelined write of puts per (priority, delay); the
        puts' receipt (what makes the requeue sweep exact) joins the epoch's, written later
        in the background.

        Per entry: its id, or the error that concerns it alone.
        """
        docs = [e.doc for e in entries]
        epoch, lead = self._receipts.join_all(docs, lambda: _leader(entries))
        now = time.time()
        for doc in docs:
            doc["queued_ts"] = now
        stored: list[tuple[str, bool] | StoreError] = []
        queued: dict[str, int] = {}
        try:
            try:
                stored = await self.store.insert_many(docs)
            except Exception as exc:
                raise _write_failed(exc) from None
            return await self._queue_stored(entries, stored, queued)
        finally:
            # Every member leaves, stored or not (a failed insert_many stored none we know of);
            # the leader is stored only if its own insert was new (not a known key's mail).
            fresh = None
            if lead is not None:
                outcome = stored[lead] if stored else None
                fresh = isinstance(outcome, tuple) and outcome[1]
            self._receipts.leave_all(epoch, len(docs), queued, leader_stored=fresh)

    async def _queue_stored(
        self, entries: list[_Entry], stored: list[tuple[str, bool] | StoreError], queued: dict[str, int]
    ) -> list[str | MailerError]:
        """The puts of the mails just stored; each job's id goes into ``queued``."""
        results: list[str | MailerError] = []
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (entry, outcome) in enumerate(zip(entries, stored, strict=True)):
            if isinstance(outcome, StoreError):
                results.append(outcome)
                continue
            mail_id, new = outcome
            results.append(mail_id)
            if new and to_queue(entry.doc):  # a mail left with no recipient is stored, not queued
                groups.setdefault((entry.priority, entry.delay), []).append(i)
        for (priority, delay), indexes in groups.items():
            ids = [str(results[i]) for i in indexes]
            puts: list[int | BeanstalkServerError] | list[BeanstalkError]
            try:
                puts = await self._put_many(ids, priority, delay)
            except BeanstalkError as exc:
                puts = [exc] * len(ids)
            for i, mail_id, put in zip(indexes, ids, puts, strict=True):
                if isinstance(put, BeanstalkError):
                    error = EnqueueError([mail_id], put)
                    error.__cause__ = put
                    results[i] = error
                else:
                    queued[mail_id] = put
        self._meter.add(len(queued))
        return results

    async def status(self, mail_id: str) -> MailRecord:
        """The stored record of a mail: status, attempts, vendor, message id."""
        self._require()
        return await self.store.get(mail_id)

    # --- the queue, with one reconnect ---------------------------------------------------

    async def _put_many(self, ids: list[str], priority: int, delay: int) -> list[int | BeanstalkServerError]:
        """Pipelined puts, each mail on its own server (by its id); a server that fails is
        reconnected once, then the next server takes its mails (see :mod:`mailer.fleet`)."""
        ttr = self.settings.beanstalkd.ttr_s
        return await self.queue.put_many(ids, priority=priority, delay=delay, ttr=ttr)

    async def _put_one(self, mail_id: str, priority: int, delay: int) -> int:
        """As :meth:`_put_many`: the fleet job id, or the last server's error."""
        ttr = self.settings.beanstalkd.ttr_s
        return await self.queue.put(mail_id, priority=priority, delay=delay, ttr=ttr)

    # --- withdrawing a mail ------------------------------------------------------------

    async def cancel(self, mail_id: str) -> Status:
        """Cancel a mail that is still ``queued`` or ``retrying``; its job is deleted unsent
        by the consumer that reserves it.

        Returns the mail's status afterwards: ``Status.CANCELLED`` when it is (or already
        was) cancelled; any other status means it is too late (being sent, sent or failed)
        and nothing changed. Raises MailNotFound for an unknown id or one that is not an id.
        """
        self._require()
        oid = parse_mail_id(mail_id)
        status = None if oid is None else await self.store.cancel(oid)
        if status is None:
            raise MailNotFound(
                f"no mail with id {mail_id!r} in collection {self.settings.mongodb.collection!r}"
            )
        return status
