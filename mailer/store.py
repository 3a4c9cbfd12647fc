"""Every MongoDB operation mailer performs, and nothing else touches MongoDB.

The same code runs on real MongoDB (6-8) and on the local nx-27017 server, so it uses only
standard operations, chosen where nx-27017 differs silently (see shared/mongodb-local.md):

- datetimes that change after insert are written with ``$currentDate`` (a ``$set`` of a
  top-level datetime reads back as a string there) or inside sub-documents set whole;
- the attempt list is ``$set`` whole, never ``$push``-ed (a pushed sub-document reads back
  as a JSON string there); the claim hands us the current list, so no extra read is needed;
- equality on indexed fields is written ``{"$eq": ...}`` and claims go by ``_id``, which
  keeps them on the index;
- times queried by range (the claim lease, the next attempt) are epoch seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, AsyncMongoClient, ReadPreference, ReturnDocument, UpdateOne, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ConfigurationError,
    DuplicateKeyError,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
)

from mailer.config import Settings
from mailer.errors import ConfigError, MailNotFound, StoreError, StoreUnavailable
from mailer.lifecycle import AsyncResource
from mailer.models import Attempt, Email, MailRecord, Status

Doc = dict[str, Any]
log = logging.getLogger("mailer.store")
_CLAIMABLE = [Status.QUEUED.value, Status.RETRYING.value]
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # MongoDB's documented BSON document limit
# How long the producer may hold a lone send's job receipt before writing it (with others'):
# the requeue sweep's in-flight bound waits this much longer for a receipt.
RECEIPT_DELAY_S = 1.0
# A suppression view announces its lease again every LEASE_ANNOUNCE_EVERY_S; writers heed
# announcements this recent (a process gone, or configured anew, stops counting after it).
LEASE_ANNOUNCE_EVERY_S = 600.0
LEASE_ANNOUNCED_FOR_S = 3600.0
# The outbox trims at most this many more than a write added (see MailStore._trim_outbox).
OUTBOX_TRIM_SLACK = 100
# Outbox writes in flight at once, at most (MailStore._keep_in_background).
OUTBOX_BACKLOG = 8
# How long webhook tokens and batch ids are remembered (replays refused, batches recognised).
SEEN_TTL_S = 24 * 3600
# What the requeue sweep reads of a candidate.
_SWEEP_FIELDS = ("status", "priority", "job_id", "batch", "queued_ts", "requeued_ts", "lease_until")
# What a failed claim reads back to tell why.
_CLAIM_VIEW = {"status": 1, "lease_until": 1, "job_id": 1, "consumer": 1, "claim": 1, "priority": 1}


def parse_mail_id(value: str | bytes) -> ObjectId | None:
    """The ObjectId in a job body or CLI argument, or None when it is not one."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    if len(value) != 24:
        return None
    try:
        return ObjectId(value)
    except (InvalidId, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class MailFilter:
    """What the console's mail list asks for; every field optional. ``recipient`` is an exact
    address, or its beginning when ``prefix``; ``since_ts``/``until_ts`` bound the epoch time
    the mail was queued."""

    status: str | None = None
    vendor: str | None = None
    recipient: str | None = None
    prefix: bool = False
    tag: str | None = None
    since_ts: float | None = None
    until_ts: float | None = None


# A console page's position: the (queued_ts, _id) of the last row shown, and how many rows
# of that queued_ts were shown so far (how many ids of that batch to read past, see below;
# -1: none of that queued_ts is left).
Cursor = tuple[float, ObjectId, int]
# What a list row leaves out (exclusions: nx-27017 returns dotted inclusions as flat keys).
_LIST_EXCLUDED = dict.fromkeys(
    ("mail.text", "mail.html", "mail.attachments", "mail.headers", "mail.metadata", "attempts", "batch_jobs"),
    0,
)
_NEWEST_FIRST = [("queued_ts", -1), ("_id", -1)]


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One simulated send's MIME message, as the development outbox keeps it."""

    mail_id: str
    vendor: str
    message_id: str
    raw: bytes
    stored_at: dt.datetime | None = None


@dataclass(slots=True)
class Finish:
    """The final (or interim) state of one delivery round, written in a group commit."""

    mail_id: str
    status: Status
    attempts: list[Doc]
    vendor: str | None = None
    message_id: str | None = None
    error: str | None = None
    next_attempt_ts: float | None = None
    job_id: int | None = None
    # The claimer and its claim's token: a retry or failure is only written while that claim
    # still stands (if its lease was taken over, the new holder's outcome stands). A send is
    # always written: the mail went out, whoever holds the claim now.
    consumer: str | None = None
    claim: str | None = None
    extra: Doc = field(default_factory=dict)
    # A simulated send's whole MIME message, for the development outbox (never on the mail).
    raw: bytes | None = None


def short_reason(exc: OperationFailure) -> str:
    """The server's own words, one line, without the echo of the command (which may quote a
    mail's content)."""
    details = exc.details if isinstance(exc.details, dict) else {}
    lines = str(details.get("errmsg") or exc).splitlines()
    return lines[0][:200] if lines else ""


def _claim_update(
    consumer: str, lease_s: float, *, token: str, job_id: int | None = None, now: float | None = None
) -> Doc:
    fields: Doc = {
        "status": Status.SENDING.value,
        "consumer": consumer,
        "claim": token,
        "lease_until": (time.time() if now is None else now) + lease_s,
    }
    if job_id is not None:
        fields["job_id"] = job_id
    return {"$set": fields, "$inc": {"rounds": 1}, "$currentDate": {"updated_at": True}}


def attempt_doc(attempt: Attempt) -> Doc:
    return attempt.model_dump(exclude_none=True)


class MailStore(AsyncResource):
    """The mails collection and the small vendor-status collection.

    One instance per process; its ``AsyncMongoClient`` pools connections for every task.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        client: AsyncMongoClient[Doc] | None = None,
        insert_client: bool = False,
    ) -> None:
        """``insert_client``: new mails are inserted through a second client of the store's
        own whose sockets have no timers, each insert bounded as a whole by one
        ``asyncio.timeout`` of ``mongodb.timeout_ms`` (and a retried write within it). pymongo
        arms asyncio timers around every socket write and read when ``timeoutMS`` or
        ``socketTimeoutMS`` is set: 60-90 us of client CPU per ``insert_one`` here, measured
        interleaved, about a tenth of a lone send. The producer's choice; every other
        operation keeps ``timeoutMS``. (A cancelled pymongo operation closes its connection,
        so a deadline never leaves a half-read reply in the pool.)"""
        self.settings = settings
        self._wants_insert_client = insert_client
        self._own_client = client is None
        self._client = client
        self._insert_client: AsyncMongoClient[Doc] | None = None
        self._collections: dict[str, AsyncCollection[Doc]] = {}
        self._mails: AsyncCollection[Doc] | None = None
        self._inserts: AsyncCollection[Doc] | None = None
        self._vendors: AsyncCollection[Doc] | None = None
        self._outbox_writes: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        m = self.settings.mongodb
        return f"<MailStore collection={m.collection!r} connected={self._mails is not None}>"

    # --- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        if self._mails is not None:
            return
        m = self.settings.mongodb
        if self._client is None:
            self._client = self._new_client(m.timeout_ms)
        if self._wants_insert_client and self._own_client and self._insert_client is None:
            self._insert_client = self._new_client(None)
        db = self._database(self._client)
        try:
            # Every write of every collection goes with the write concern; claims (and every
            # read) go to the primary, which a claim's compare-and-set must see.
            db = db.with_options(
                write_concern=await self._write_concern(db), read_preference=ReadPreference.PRIMARY
            )
            self._mails = db[m.collection]
            self._inserts = self._mails
            if self._insert_client is not None:
                self._inserts = self._database(self._insert_client).with_options(
                    write_concern=db.write_concern, read_preference=ReadPreference.PRIMARY
                )[m.collection]
            self._vendors = db[m.vendor_status_collection]
            await self.ensure_indexes()
        except (PyMongoError, KeyError) as exc:
            await self.close()
            if isinstance(exc, KeyError) or (isinstance(exc, OperationFailure) and exc.code in (13, 18)):
                # 13 Unauthorized, 18 AuthenticationFailed; a KeyError is pymongo's SCRAM
                # handshake reading a reply field that a server without authentication
                # (nx-27017) does not send. A ConfigError: retrying cannot help, the URI must change.
                raise ConfigError(
                    "MongoDB did not accept the credentials in mongodb.uri: check the user name, the "
                    "password and the authSource, or drop them if the server has no authentication"
                ) from None
            if isinstance(exc, OperationFailure):
                # The server answered, and refused: saying "cannot reach" would send the
                # operator to the network. nx-27017 and MongoDB both say so on a full disk.
                detail = short_reason(exc)
                full = "full" in detail.lower() or "space" in detail.lower() or exc.code == 14031
                hint = "free disk space on the MongoDB server" if full else "see the server's log"
                code = "" if exc.code is None else f"code {exc.code}: "
                raise StoreError(
                    f"MongoDB refused to set up collection {m.collection!r} ({code}{detail}); {hint}"
                ) from None
            raise StoreUnavailable(
                f"cannot reach MongoDB ({type(exc).__name__}): check mongodb.uri and that the server "
                "is running ('make services' starts the local one)"
            ) from None

    def _new_client(self, timeout_ms: int | None) -> AsyncMongoClient[Doc]:
        """A client; ``timeout_ms`` None for one with no timers on its sockets (deadlines
        are then the caller's, see ``insert_client``)."""
        m = self.settings.mongodb
        try:
            return AsyncMongoClient(
                m.uri.get_secret_value(),
                tz_aware=True,
                tzinfo=dt.UTC,
                timeoutMS=timeout_ms,
                serverSelectionTimeoutMS=m.timeout_ms,
                connectTimeoutMS=m.timeout_ms,
                appname="mailer",
            )
        except (ConfigurationError, ValueError) as exc:
            # pymongo parses the URI here (a ValueError for some bad ports and unescaped
            # passwords). Its message may quote parts of the URI, so only the type is shown.
            raise ConfigError(
                f"mongodb.uri is unusable ({type(exc).__name__}): percent-escape the user name "
                "and password (urllib.parse.quote_plus), check the host, port and options, and "
                "that a mongodb+srv:// host resolves"
            ) from None

    def _database(self, client: AsyncMongoClient[Doc]) -> AsyncDatabase[Doc]:
        name = self.settings.mongodb.database
        return client[name] if name else client.get_default_database(default="mailer")

    async def _write_concern(self, db: AsyncDatabase[Doc]) -> WriteConcern:
        """``mongodb.write_concern`` if set; else a ``w=`` the URI gives; else the server is
        asked (one ``hello``): "majority" on a replica set or through a ``mongos``, so that
        an acknowledged mail survives a failover; 1 on a standalone, which has no majority
        to wait for."""
        m = self.settings.mongodb
        from_uri = db.write_concern.document.get("w")
        if m.write_concern is not None or from_uri is not None:
            return self.write_concern_for({}, uri_w=from_uri)
        return self.write_concern_for(await db.client.admin.command("hello"))

    def write_concern_for(self, hello: Doc, *, uri_w: int | str | None = None) -> WriteConcern:
        """The write concern for a server whose ``hello`` reply is ``hello``: "majority" on a
        replica set member (its reply names the set, ``setName``) and on a sharded cluster's
        ``mongos`` (``msg: "isdbgrid"``; its shards are replica sets, and a ``w: 1`` there
        could lose an acknowledged mail in a shard's failover), 1 on a standalone."""
        m = self.settings.mongodb
        replicated = bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"
        w: int | str = "majority" if replicated else 1
        if m.write_concern is not None:
            w = m.write_concern
        elif uri_w is not None:
            w = uri_w
        return WriteConcern(w=w, j=m.journal)

    async def ensure_indexes(self) -> None:
        await self.mails.create_index("idempotency_key", unique=True, sparse=True)
        # Claims and the sweep ask by status (the compound's prefix serves them); the console
        # lists mails newest first by (queued_ts, _id), all of them or of one status.
        # An index that ends in the sort, _id included: MongoDB serves a sort from an index
        # only when the index holds every sort key, and sorts in memory otherwise (up to its
        # 100 MB limit, then fails). nx-27017 takes _id in a compound index but then refuses
        # every insert ("JSON path error near '_id'"); its planner breaks queued_ts ties by
        # itself, so there the indexes stop before _id.
        sort = _NEWEST_FIRST if not await self._is_nx() else _NEWEST_FIRST[:1]
        await self.mails.create_index([("status", ASCENDING), *sort])
        await self.mails.create_index(sort)
        if self.keeps_raw:
            await self.outbox.create_index("mail_id")

    async def _is_nx(self) -> bool:
        """Whether the server is the local stand-in nx-27017 (its ``buildInfo`` names its
        process; MongoDB's never has that field). ``buildInfo`` needs no privilege."""
        info = await self.mails.database.client.admin.command("buildInfo")
        return bool(info.get("process") == "nx_27017")

    async def close(self) -> None:
        pending = [t for t in self._outbox_writes if not t.done()]
        if pending:  # the copies of the last sends, if MongoDB takes them soon
            _, late = await asyncio.wait(pending, timeout=self.settings.mongodb.timeout_ms / 1000)
            for task in late:
                task.cancel()
        self._outbox_writes = set()
        if self._insert_client is not None:
            await self._insert_client.close()
            self._insert_client = None
        if self._client is not None and self._own_client:
            await self._client.close()
            self._client = None
        self._mails = self._inserts = self._vendors = None
        self._collections.clear()  # made again from the next connection's database

    @property
    def mails(self) -> AsyncCollection[Doc]:
        if self._mails is None:
            raise StoreError("the store is not connected; call connect() first")
        return self._mails

    @property
    def vendor_status(self) -> AsyncCollection[Doc]:
        if self._vendors is None:
            raise StoreError("the store is not connected; call connect() first")
        return self._vendors

    # --- the send path -----------------------------------------------------------------

    @staticmethod
    def new_document(email: Email, *, priority: int) -> Doc:
        """A new mail's document: only the fields a query or a guarantee needs at insert.

        Every stored field costs each insert (measured on nx-27017 with ``insert_many``: 304 us
        of server CPU per mail for the former 11 top-level fields, 232 us for 5, 174 us for
        the original's 4), so a field whose absence reads the same is left out until a later
        update writes it: ``updated_at`` (a record without one was last updated when
        created), ``rounds`` (``$inc`` creates it), ``lease_until`` (only a claim's lease is
        queried), ``attempts`` (absent reads as none; a round ``$set``s the list whole),
        ``job_id`` (the claim writes it) and ``requeued_ts`` (the sweep's compare-and-set
        matches a missing one with ``{"$eq": None}``, as MongoDB documents), and the mail's
        own empty defaults (``Email.from_stored`` restores them). What stays and why:

        - ``status``: claims and the sweep's indexed ``$eq``;
        - ``mail``: the content;
        - ``priority``: requeue and release at the mail's own priority;
        - ``created_at``: the record, and the one date field a TTL index or a time-range query
          of the operator's can use;
        - ``next_attempt_ts``: the sweep's age filter (a delayed mail is not an orphan);
        - ``batch`` and ``queued_ts``: the sweep's job receipt and in-flight bound (the
          producer stamps both again just before the write);
        - ``idempotency_key`` when set: the sparse unique index.
        """
        now = dt.datetime.now(dt.UTC)
        oid = ObjectId()
        ts = time.time()
        doc: Doc = {
            "_id": oid,
            "status": Status.QUEUED.value,
            "mail": email.model_dump(mode="python", exclude_none=True, exclude_defaults=True),
            "priority": priority,
            "created_at": now,
            "next_attempt_ts": ts + email.delay_seconds(now),
            "batch": str(oid),
            "queued_ts": ts,
        }
        if email.idempotency_key is not None:
            # Only when set: the unique index is sparse, so absent keys never collide.
            doc["idempotency_key"] = email.idempotency_key
        return doc

    @staticmethod
    def too_large(doc: Doc) -> str | None:
        """Why MongoDB would refuse this document on its own (over its 16 MiB limit), or None.

        Checked before the write, not left to the server: real MongoDB refuses such a
        document alone, but nx-27017 takes it and stalls the whole batch past its timeout.
        Encoding costs about 10 us per small mail, so callers only ask for large ones.
        """
        size = len(bson.encode(doc))
        if size <= MAX_DOCUMENT_BYTES:
            return None
        return (
            f"the mail is {size} bytes as stored, over MongoDB's {MAX_DOCUMENT_BYTES} byte (16 MiB) "
            "document limit: make its attachments smaller (or set producer.max_email_bytes below "
            "12 MB); nothing was stored"
        )

    @property
    def _insert_to(self) -> AsyncCollection[Doc]:
        if self._inserts is None:
            raise StoreError("the store is not connected; call connect() first")
        return self._inserts

    async def _within_deadline(self, write: Awaitable[object]) -> None:
        """One insert, bounded as a whole (see ``insert_client``); a missed deadline is
        pymongo's own NetworkTimeout, so it is handled as a socket timeout always was.
        Without an insert client the client's own ``timeoutMS`` is the deadline."""
        if self._insert_client is None:
            await write
            return
        try:
            async with asyncio.timeout(self.settings.mongodb.timeout_ms / 1000):
                await write
        except TimeoutError:
            raise NetworkTimeout(
                f"MongoDB did not answer the insert within mongodb.timeout_ms "
                f"({self.settings.mongodb.timeout_ms} ms)"
            ) from None

    async def insert(self, doc: Doc) -> tuple[str, bool]:
        """Insert one new mail; ``(id, False)`` when its idempotency key was already used."""
        try:
            await self._within_deadline(self._insert_to.insert_one(doc))
        except DuplicateKeyError:
            existing = await self._by_key(doc.get("idempotency_key"))
            if existing is None:
                raise
            return existing, False
        return str(doc["_id"]), True

    async def insert_many(self, docs: Sequence[Doc]) -> list[tuple[str, bool] | StoreError]:
        """One unordered ``insert_many``; per doc ``(id, new)`` or the error for that doc alone.

        A doc whose idempotency key is known gets the existing id and ``new=False``. When the
        call fails as a whole (a timeout, a refused message), the docs are written again one
        by one, at once: ids are fixed, so a doc the failed call did store is recognised (its
        ``_id`` is taken) instead of duplicated, and one bad doc fails only itself. A single
        doc's whole-call failure raises: it is then unknown whether it was stored.
        """
        if not docs:
            return []
        refused: dict[int, Doc] = {}
        try:
            await self._within_deadline(self._insert_to.insert_many(docs, ordered=False))
        except BulkWriteError as exc:
            refused = {int(err["index"]): err for err in exc.details.get("writeErrors", [])}
        except PyMongoError:
            if len(docs) == 1:
                raise
            return list(await asyncio.gather(*(self._insert_alone(doc) for doc in docs)))
        out: list[tuple[str, bool] | StoreError] = []
        for i, doc in enumerate(docs):
            err = refused.get(i)
            if err is None:
                out.append((str(doc["_id"]), True))
                continue
            existing = await self._by_key(doc.get("idempotency_key")) if err.get("code") == 11000 else None
            if existing is None:
                out.append(
                    StoreError(f"MongoDB refused the mail (code {err.get('code')}): {err.get('errmsg')}")
                )
            else:
                out.append((existing, False))
        return out

    async def _insert_alone(self, doc: Doc) -> tuple[str, bool] | StoreError:
        """One doc of a batch that failed as a whole, written again by itself."""
        try:
            await self._within_deadline(self._insert_to.insert_one(doc))
        except DuplicateKeyError:
            if await self.mails.find_one({"_id": doc["_id"]}, {"_id": 1}) is not None:
                return str(doc["_id"]), True  # the failed batch did store it
            existing = await self._by_key(doc.get("idempotency_key"))
            if existing is None:
                return StoreError("MongoDB refused the mail as a duplicate, yet no mail holds its key")
            return existing, False
        except PyMongoError as exc:
            return StoreError(
                f"MongoDB failed during the write ({type(exc).__name__}: {exc}); the mail may or may "
                "not be stored: if it is, the requeue sweep queues it"
            )
        return str(doc["_id"]), True

    async def _by_key(self, key: str | None) -> str | None:
        if key is None:
            return None
        found = await self.mails.find_one({"idempotency_key": {"$eq": key}}, {"_id": 1})
        return None if found is None else str(found["_id"])

    async def record_jobs(self, leader: str, jobs: dict[str, int]) -> None:
        """The receipt of a batch's puts, ``{mail id: job id}``, on one mail of the batch.

        One small update per batch, never one per mail: the mails point at it by ``batch``.
        This is what lets the requeue sweep ask beanstalkd about each mail's own job.
        """
        await self.mails.update_one({"_id": ObjectId(leader)}, {"$set": {"batch_jobs": jobs}})

    async def record_job_ids(self, jobs: dict[str, int]) -> None:
        """Each mail's own job id, for mails no receipt can carry (their leader was not
        stored) and for the sweep's requeues; one ``bulk_write``."""
        if jobs:
            ops = [UpdateOne({"_id": ObjectId(m)}, {"$set": {"job_id": j}}) for m, j in jobs.items()]
            await self.mails.bulk_write(ops, ordered=False)

    async def receipts(self, leaders: Iterable[str]) -> dict[str, dict[str, int] | None]:
        """``{leader: {mail id: job id}}`` (None: no receipt yet) for the leaders still stored."""
        oids = [oid for oid in {parse_mail_id(x) for x in leaders} if oid is not None]
        out: dict[str, dict[str, int] | None] = {}
        async for doc in self.mails.find({"_id": {"$in": oids}}, {"batch_jobs": 1}):
            jobs = doc.get("batch_jobs")
            receipt = {str(k): int(v) for k, v in jobs.items()} if isinstance(jobs, dict) else None
            out[str(doc["_id"])] = receipt
        return out

    async def get(self, mail_id: str) -> MailRecord:
        oid = parse_mail_id(mail_id)
        doc = None if oid is None else await self.mails.find_one({"_id": oid})
        if doc is None:
            raise MailNotFound(
                f"no mail with id {mail_id!r} in collection {self.settings.mongodb.collection!r}"
            )
        return to_record(doc)

    async def delete(self, mail_id: str) -> bool:
        oid = parse_mail_id(mail_id)
        if oid is None:
            return False
        return (await self.mails.delete_one({"_id": oid})).deleted_count == 1

    async def cancel(self, oid: ObjectId) -> Status | None:
        """Withdraw a mail not yet taken for delivery: a compare-and-set queued/retrying ->
        cancelled, so a consumer's claim and a cancel can never both win.

        Returns the mail's status after the call: ``CANCELLED`` when it is cancelled (now or
        before), the status that made it too late (sending, sent, failed), or None when no
        mail has this id. Its job stays on the tube; the consumer that reserves it deletes
        it unsent (a cancelled mail is finished for the claim).
        """
        done = await self.mails.find_one_and_update(
            {"_id": oid, "status": {"$in": _CLAIMABLE}},
            {
                "$set": {"status": Status.CANCELLED.value, "lease_until": 0.0},
                "$currentDate": {"updated_at": True, "cancelled_at": True},
            },
            projection={"_id": 1},
        )
        if done is not None:
            return Status.CANCELLED
        current = await self.mails.find_one({"_id": oid}, {"status": 1})
        if current is None:
            return None
        try:
            return Status(str(current.get("status")))
        except ValueError:
            raise StoreError(
                f"mail {oid} has a status mailer never writes ({str(current.get('status'))[:40]!r}); "
                "inspect it with 'mailer status'"
            ) from None

    # --- the deliver path --------------------------------------------------------------

    async def claim_one(
        self,
        oid: ObjectId,
        *,
        job_id: int,
        consumer: str,
        token: str,
        lease_s: float,
        now: float | None = None,
    ) -> Doc | None:
        """Atomically claim a queued or retrying mail; the claimed document, or None when the
        filter matched nothing (see :mod:`mailer.claims` for what that means)."""
        return await self.mails.find_one_and_update(
            {"_id": oid, "status": {"$in": _CLAIMABLE}},
            _claim_update(consumer, lease_s, job_id=job_id, token=token, now=now),
            return_document=ReturnDocument.AFTER,
        )

    async def claim_all(
        self, oids: Sequence[ObjectId], *, consumer: str, token: str, lease_s: float, now: float | None = None
    ) -> dict[ObjectId, Doc]:
        """Claim every queued or retrying mail of ``oids`` in one ``update_many`` (atomic per
        document) stamped with ``token``, then read them all back in one ``find``: a document
        whose ``claim`` is ``token`` was won by this call. The job id is written with the
        delivery's record instead (one value per document does not fit one ``update_many``)."""
        await self.mails.update_many(
            {"_id": {"$in": list(oids)}, "status": {"$in": _CLAIMABLE}},
            _claim_update(consumer, lease_s, token=token, now=now),
        )
        return {doc["_id"]: doc async for doc in self.mails.find({"_id": {"$in": list(oids)}})}

    async def claim_view(self, oid: ObjectId) -> Doc | None:
        """What a claim that did not take reads back to tell why."""
        return await self.mails.find_one({"_id": oid}, _CLAIM_VIEW)

    async def take_over(
        self,
        oid: ObjectId,
        *,
        seen: str | None,
        job_id: int,
        consumer: str,
        token: str,
        lease_s: float,
        now: float | None = None,
    ) -> Doc | None:
        """Compare-and-set a ``sending`` mail's claim ``seen`` to a new one; None when the
        claim changed meanwhile (another taker won, or it was finished)."""
        return await self.mails.find_one_and_update(
            {"_id": oid, "status": {"$eq": Status.SENDING.value}, "claim": seen},
            _claim_update(consumer, lease_s, job_id=job_id, token=token, now=now),
            return_document=ReturnDocument.AFTER,
        )

    async def renew_claim(
        self, oid: ObjectId, token: str, lease_s: float, *, now: float | None = None
    ) -> bool:
        """Fence: extend the lease of claim ``token`` if it is still the mail's claim.

        False when the claim was taken over (its lease ran out while this process stalled)
        or the mail was finished: the caller must then send nothing more for it.
        """
        t = time.time() if now is None else now
        result = await self.mails.update_one(
            {"_id": oid, "status": {"$eq": Status.SENDING.value}, "claim": {"$eq": token}},
            {"$set": {"lease_until": t + lease_s}},
        )
        return result.matched_count == 1

    async def extend_lease(self, oid: ObjectId, consumer: str, lease_s: float) -> None:
        await self.mails.update_one(
            {"_id": oid, "consumer": {"$eq": consumer}, "status": {"$eq": Status.SENDING.value}},
            {"$set": {"lease_until": time.time() + lease_s}},
        )

    async def extend_leases(self, oids: Sequence[ObjectId], consumer: str, lease_s: float) -> None:
        """Extend many of ``consumer``'s claims in one update (the consumer's keepalive)."""
        if oids:
            await self.mails.update_many(
                {
                    "_id": {"$in": list(oids)},
                    "consumer": {"$eq": consumer},
                    "status": {"$eq": Status.SENDING.value},
                },
                {"$set": {"lease_until": time.time() + lease_s}},
            )

    @staticmethod
    def _finish_op(f: Finish) -> UpdateOne:
        fields: Doc = {
            "status": f.status.value,
            "attempts": f.attempts,
            "error": f.error,
            "lease_until": 0.0,
            **f.extra,
        }
        dates: Doc = {"updated_at": True}
        if f.status is Status.SENT:
            fields["vendor"] = f.vendor
            fields["message_id"] = f.message_id
            dates["sent_at"] = True
        if f.next_attempt_ts is not None:
            fields["next_attempt_ts"] = f.next_attempt_ts
        if f.job_id is not None:
            fields["job_id"] = f.job_id
        where: Doc = {"_id": ObjectId(f.mail_id)}
        if f.status is not Status.SENT and (f.consumer is not None or f.claim is not None):
            where["status"] = {"$eq": Status.SENDING.value}
            if f.claim is not None:
                where["claim"] = {"$eq": f.claim}
            else:
                where["consumer"] = {"$eq": f.consumer}
        return UpdateOne(where, {"$set": fields, "$currentDate": dates})

    async def finish_many(self, finishes: Iterable[Finish]) -> None:
        """Write many delivery results in one ``bulk_write`` (the consumer's group commit)."""
        done = list(finishes)
        ops = [self._finish_op(f) for f in done]
        if ops:
            await self.mails.bulk_write(ops, ordered=False)
            self._keep_in_background(done)

    async def release_claim(
        self, oid: ObjectId, status: Status = Status.QUEUED, *, token: str | None = None
    ) -> None:
        """Give an unfinished claim back (shutdown) so the next consumer can take it at once;
        with ``token``, only if that claim still stands (never another consumer's)."""
        where: Doc = {"_id": oid, "status": {"$eq": Status.SENDING.value}}
        if token is not None:
            where["claim"] = {"$eq": token}
        await self.mails.update_one(
            where,
            {"$set": {"status": status.value, "lease_until": 0.0}, "$currentDate": {"updated_at": True}},
        )

    # --- vendor availability shared by every consumer ----------------------------------

    async def vendor_marks(self) -> dict[str, tuple[float, str]]:
        """``{vendor: (unavailable_until_epoch, reason)}`` for every vendor ever marked."""
        out: dict[str, tuple[float, str]] = {}
        async for doc in self.vendor_status.find({}):
            out[str(doc["_id"])] = (float(doc.get("until", 0.0)), str(doc.get("reason", "")))
        return out

    async def mark_vendor(self, name: str, until: float, reason: str) -> None:
        """Mark ``name`` unavailable until ``until``; ``$max`` keeps the longest of rival marks."""
        await self.vendor_status.update_one(
            {"_id": name},
            {"$max": {"until": until}, "$set": {"reason": reason[:500], "marked_at": time.time()}},
            upsert=True,
        )

    async def clear_vendor(self, name: str) -> None:
        """A successful probe closes the breaker for everyone."""
        await self.vendor_status.update_one(
            {"_id": name}, {"$set": {"until": 0.0, "reason": "", "marked_at": time.time()}}, upsert=True
        )

    # --- operations --------------------------------------------------------------------

    async def status_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in Status}
        cursor = await self.mails.aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
        async for row in cursor:
            counts[str(row["_id"])] = int(row["n"])
        return counts

    async def find_orphans(
        self, *, older_than_s: float, now: float | None = None, chunk: int = 1000
    ) -> AsyncIterator[list[Doc]]:
        """Candidates for the requeue sweep, in chunks: queued or retrying mails whose time to
        go came more than ``older_than_s`` ago, and sending mails whose claim lease ran out.

        Candidates, not orphans: the sweep asks beanstalkd about each one's job. One query
        per status, each an indexed ``$eq`` (an ``$or`` would scan on nx-27017).
        """
        now = time.time() if now is None else now
        cutoff = now - older_than_s
        projection = dict.fromkeys(_SWEEP_FIELDS, 1)
        queries: list[Doc] = [
            {"status": {"$eq": Status.QUEUED.value}, "next_attempt_ts": {"$lt": cutoff}},
            {"status": {"$eq": Status.RETRYING.value}, "next_attempt_ts": {"$lt": cutoff}},
            {"status": {"$eq": Status.SENDING.value}, "lease_until": {"$lt": now}},
        ]
        for query in queries:
            found: list[Doc] = []
            async for doc in self.mails.find(query, projection).batch_size(chunk):
                found.append(doc)
                if len(found) >= chunk:
                    yield found
                    found = []
            if found:
                yield found

    async def mark_requeued(self, seen: Sequence[Doc], *, token: str, now: float) -> set[ObjectId]:
        """Compare-and-set of a chunk of orphans; returns the ids this sweep won.

        Each document is won only if it is still as the sweep saw it: the same
        ``requeued_ts`` (which every requeue changes) and still claimable, or still under an
        expired lease. One ``update_many`` per distinct ``(requeued_ts, kind)`` seen (almost
        always one or two per chunk), each stamping ``token``; a ``find`` then tells which
        documents carry it. Of two sweeps, one wins each document, as in ``claim_many``.
        """
        groups: dict[tuple[float | None, bool], list[ObjectId]] = {}
        for doc in seen:
            sending = doc.get("status") == Status.SENDING.value
            groups.setdefault((doc.get("requeued_ts"), sending), []).append(doc["_id"])
        stamp: Doc = {"$set": {"requeued_ts": now, "requeue_token": token, "next_attempt_ts": now}}
        for (expected, sending), oids in groups.items():
            where: Doc = {"_id": {"$in": oids}, "requeued_ts": {"$eq": expected}}
            if sending:
                where |= {"status": {"$eq": Status.SENDING.value}, "lease_until": {"$lt": now}}
            else:
                where["status"] = {"$in": _CLAIMABLE}
            await self.mails.update_many(where, stamp)
        oids = [doc["_id"] for doc in seen]
        return {
            doc["_id"]
            async for doc in self.mails.find({"_id": {"$in": oids}}, {"requeue_token": 1})
            if doc.get("requeue_token") == token
        }

    # --- rate limits and throttles (mailer.ratelimit, the routing's throttle pause) -----

    @property
    def rate_windows(self) -> AsyncCollection[Doc]:
        """Send counts of short time windows, one document per vendor and window. Named after
        the vendor-status collection, so test runs and production stay apart with it."""
        name = self.settings.mongodb.vendor_status_collection + "_rates"
        return self.vendor_status.database[name]

    async def ensure_rate_indexes(self) -> None:
        """The index the clean-up of ended windows deletes by."""
        await self.rate_windows.create_index("ends")

    async def count_sends(self, key: str, n: int, *, ends: float) -> int:
        """Add ``n`` to the send count of window ``key`` and return the count after it.

        One atomic ``find_one_and_update`` that creates the window on first use, so rival
        processes never both see the same count; ``ends`` (epoch seconds) is when the window
        is over, for :meth:`drop_rate_windows`.
        """
        doc = await self.rate_windows.find_one_and_update(
            {"_id": key},
            {"$inc": {"n": n}, "$set": {"ends": ends}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        return int(doc["n"]) if doc is not None else n

    async def drop_rate_windows(self, *, ended_before: float) -> int:
        """Delete the windows that ended before ``ended_before``; returns how many."""
        result = await self.rate_windows.delete_many({"ends": {"$lt": ended_before}})
        return int(result.deleted_count)

    async def mark_vendor_throttled(self, name: str, until: float, reason: str) -> bool:
        """Pause ``name`` until ``until`` unless a longer mark stands; True when written.

        Unlike :meth:`mark_vendor` the reason is written only with the time: a short pause
        written over an outage's mark must neither shorten it nor take its reason (which
        tells every process whether to probe the vendor when the mark runs out).
        """
        await self.vendor_status.update_one(
            {"_id": name}, {"$setOnInsert": {"until": 0.0, "reason": ""}}, upsert=True
        )
        result = await self.vendor_status.update_one(
            {"_id": name, "until": {"$lt": until}},
            {"$set": {"until": until, "reason": reason[:500], "marked_at": time.time()}},
        )
        return result.modified_count == 1

    # --- health: heartbeats of running consumers, and a ping (mailer check, /healthz) ---

    @property
    def consumers(self) -> AsyncCollection[Doc]:
        """One small document per running consumer process, upserted by its heartbeat."""
        return self.vendor_status.database[self.settings.consumer.heartbeat_collection]

    async def heartbeat(self, consumer_id: str, *, host: str, pid: int, tube: str, started: float) -> None:
        """Say this consumer is alive now (epoch ``seen``); creates its document on first use."""
        await self.consumers.update_one(
            {"_id": consumer_id},
            {"$set": {"host": host, "pid": pid, "tube": tube, "started": started, "seen": time.time()}},
            upsert=True,
        )

    async def drop_heartbeat(self, consumer_id: str) -> None:
        """A consumer that stops says so, rather than look alive for three more intervals."""
        await self.consumers.delete_one({"_id": consumer_id})

    async def live_consumers(self, tube: str, *, seen_since: float) -> list[Doc]:
        """The consumers of ``tube`` whose heartbeat is at least as recent as ``seen_since``."""
        where = {"tube": {"$eq": tube}, "seen": {"$gte": seen_since}}
        return [doc async for doc in self.consumers.find(where).sort("_id", 1)]

    async def ping(self) -> float:
        """One round trip to the server; returns its seconds (raises the driver's error)."""
        t0 = time.monotonic()
        await self.mails.database.command("ping")
        return time.monotonic() - t0

    # --- events and suppression -------------------------------------------------------
    # Collections named after the mails collection (so test runs and production stay
    # apart with it): events attached to a mail, events of mails we do not know (kept
    # apart, countable), the suppression list (``_id`` = normalised address: the send-time
    # check is one ``_id $in`` query, no secondary index), and webhook tokens and batches
    # already seen (replays; a TTL index forgets them). Their indexes are made on first use
    # by this process, so a producer that never reads events pays nothing at connect.

    def _named(self, suffix: str) -> AsyncCollection[Doc]:
        """The collection named after the mails collection, made once per connection (a
        pymongo collection object costs a lone send's suppression check 2% to build)."""
        known = self._collections.get(suffix)
        if known is None:
            known = self._collections[suffix] = self.mails.database[
                f"{self.settings.mongodb.collection}_{suffix}"
            ]
        return known

    @property
    def events(self) -> AsyncCollection[Doc]:
        return self._named("events")

    @property
    def unknown_events(self) -> AsyncCollection[Doc]:
        return self._named("events_unknown")

    @property
    def suppressions(self) -> AsyncCollection[Doc]:
        return self._named("suppressions")

    @property
    def webhook_seen(self) -> AsyncCollection[Doc]:
        return self._named("webhook_seen")

    async def ensure_event_indexes(self) -> None:
        """The mails' vendor message id (sparse: only sent mails have one), the events' mail,
        and the expiry of remembered webhook tokens. Idempotent; once per store instance."""
        if getattr(self, "_event_indexes", False):
            return
        await self.mails.create_index("message_id", sparse=True)
        await self.events.create_index("mail_id")
        await self.webhook_seen.create_index("at", expireAfterSeconds=SEEN_TTL_S)
        self._event_indexes = True

    async def mails_by_message_id(self, message_ids: Sequence[str]) -> dict[str, str]:
        """``{vendor message id: mail id}`` for the ids a sent mail recorded; one query."""
        if not message_ids:
            return {}
        await self.ensure_event_indexes()
        where = {"message_id": {"$in": sorted(set(message_ids))}}
        return {str(d["message_id"]): str(d["_id"]) async for d in self.mails.find(where, {"message_id": 1})}

    async def known_mails(self, mail_ids: Iterable[str]) -> set[str]:
        """Which of these ids (our X-Mailer-Id, echoed by a vendor) are stored mails."""
        oids = [oid for oid in {parse_mail_id(m) for m in mail_ids} if oid is not None]
        if not oids:
            return set()
        return {str(d["_id"]) async for d in self.mails.find({"_id": {"$in": oids}}, {"_id": 1})}

    async def record_events(self, docs: Sequence[Doc], *, unknown: bool = False) -> list[bool]:
        """Insert event documents (each with its deterministic ``_id``) in one unordered
        ``insert_many``; per doc, whether it is new (False: the vendor sent it before)."""
        if not docs:
            return []
        target = self.unknown_events if unknown else self.events
        duplicates: set[int] = set()
        try:
            await target.insert_many(list(docs), ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(err.get("code") != 11000 for err in errors):
                raise StoreError(f"MongoDB refused delivery events: {errors[0].get('errmsg')}") from None
            duplicates = {int(err["index"]) for err in errors}
        return [i not in duplicates for i in range(len(docs))]

    async def events_of(self, mail_id: str, *, limit: int = 100) -> list[Doc]:
        """A mail's events, oldest first (at most ``limit``)."""
        await self.ensure_event_indexes()
        found = self.events.find({"mail_id": {"$eq": mail_id}}, {"raw": 0}).sort("at", 1).limit(limit)
        return [doc async for doc in found]

    async def count_unknown_events(self) -> int:
        return int(await self.unknown_events.count_documents({}))

    async def delivery_of(self, mail_id: str) -> Doc:
        """A mail's delivery summary and dropped recipients: ``{"delivery", "suppressed"}``."""
        oid = parse_mail_id(mail_id)
        view = {"delivery": 1, "suppressed": 1}
        doc = (None if oid is None else await self.mails.find_one({"_id": oid}, view)) or {}
        return {"delivery": doc.get("delivery"), "suppressed": list(doc.get("suppressed") or [])}

    async def update_delivery(
        self, mail_id: str, merge: Callable[[Doc | None], Doc], *, tries: int = 5
    ) -> bool:
        """Set a mail's ``delivery`` summary whole to ``merge(current)``: a compare-and-set on
        a version counter, retried, so two webhooks for one mail never lose each other's
        news (a sub-document set whole is what nx-27017 stores faithfully)."""
        oid = parse_mail_id(mail_id)
        if oid is None:
            return False
        for _ in range(tries):
            doc = await self.mails.find_one({"_id": oid}, {"delivery": 1, "delivery_v": 1})
            if doc is None:
                return False
            version = int(doc.get("delivery_v", 0))
            where: Doc = {"_id": oid, "delivery_v": {"$eq": version} if version else {"$exists": False}}
            done = await self.mails.update_one(
                where, {"$set": {"delivery": merge(doc.get("delivery")), "delivery_v": version + 1}}
            )
            if done.matched_count == 1:
                return True
        return False

    async def suppressed_among(self, addresses: Collection[str]) -> set[str]:
        """Which of these (normalised) addresses are on the list: one ``_id $in`` query."""
        if not addresses:
            return set()
        where = {"_id": {"$in": sorted(addresses)}}
        return {str(d["_id"]) async for d in self.suppressions.find(where, {"_id": 1})}

    async def add_suppression(
        self, address: str, *, reason: str, source: Doc | None = None, settle: bool = True
    ) -> bool:
        """Put an address on the list; False when it already was (the first entry stands).
        ``settle``: return only once every process's view of the list has it (see
        :meth:`settle_suppressions`); a caller adding many passes False and settles once."""
        doc: Doc = {"_id": address, "reason": reason[:200], "at": dt.datetime.now(dt.UTC)}
        if source:
            doc["source"] = source
        try:
            await self.suppressions.insert_one(doc)
        except DuplicateKeyError:
            return False
        await self._suppressions_changed(settle)
        return True

    async def add_suppressions(self, addresses: Sequence[str], *, reason: str, settle: bool = True) -> int:
        """Put many addresses on the list in one unordered ``insert_many`` (an import);
        returns how many were new (the others' first entries stand)."""
        if not addresses:
            return 0
        now = dt.datetime.now(dt.UTC)
        docs = [{"_id": a, "reason": reason[:200], "at": now} for a in dict.fromkeys(addresses)]
        try:
            await self.suppressions.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(err.get("code") != 11000 for err in errors):
                await self._suppressions_changed(settle)  # the others went in
                raise StoreError(f"MongoDB refused suppressions: {errors[0].get('errmsg')}") from None
            added = len(docs) - len(errors)
        else:
            added = len(docs)
        if added:
            await self._suppressions_changed(settle)
        return added

    async def remove_suppression(self, address: str, *, settle: bool = True) -> bool:
        removed = (await self.suppressions.delete_one({"_id": address})).deleted_count == 1
        if removed:
            await self._suppressions_changed(settle)
        return removed

    # The processes that send keep a view of the list (mailer.suppression_view), trusted for
    # [suppression] lease_s after each read of the list's generation; every change bumps the
    # generation, and a change is acknowledged only a lease later, when every trusted view
    # has read it. So a send that starts after an add was acknowledged always sees it.

    @property
    def suppressions_state(self) -> AsyncCollection[Doc]:
        return self._named("suppressions_state")

    async def suppression_generation(self) -> int:
        """The list's generation: a counter every change bumps (0 before the first)."""
        doc = await self.suppressions_state.find_one({"_id": "generation"})
        return int(doc["n"]) if doc is not None else 0

    async def all_suppressions(self, limit: int) -> list[str]:
        """Up to ``limit`` listed addresses (a view's load)."""
        return [str(d["_id"]) async for d in self.suppressions.find({}, {"_id": 1}).limit(limit)]

    async def _suppressions_changed(self, settle: bool) -> None:
        await self.suppressions_state.update_one({"_id": "generation"}, {"$inc": {"n": 1}}, upsert=True)
        if settle:
            await self.settle_suppressions()

    async def announce_suppression_lease(self, lease_s: float) -> None:
        """A view will trust its copy for ``lease_s``: say so where every writer looks, before
        it does (one document per lease in use, stamped; see :meth:`settle_suppressions`)."""
        await self.suppressions_state.update_one(
            {"_id": f"lease {lease_s!r}"},
            {"$set": {"lease_s": float(lease_s), "at": time.time()}},
            upsert=True,
        )

    async def longest_suppression_lease(self) -> float:
        """The longest lease a view announced within ``LEASE_ANNOUNCED_FOR_S`` (0 for none)."""
        since = time.time() - LEASE_ANNOUNCED_FOR_S
        found = self.suppressions_state.find({"lease_s": {"$gt": 0}, "at": {"$gte": since}})
        return max([float(d["lease_s"]) async for d in found], default=0.0)

    async def settle_suppressions(self) -> None:
        """Wait out the views' lease (a little more, for clocks that run at different rates):
        after it, no process trusts a view read before the change.

        The longest lease any view announced, not only this process's: a writer configured
        with a shorter ``lease_s`` (or 0, querying per write itself) than some sender would
        otherwise return while that sender still trusts a copy without the change."""
        lease = max(self.settings.suppression.lease_s, await self.longest_suppression_lease())
        if lease > 0:
            await asyncio.sleep(lease * 1.05 + 0.01)

    async def list_suppressions(self, *, after: str = "", limit: int = 100) -> list[Doc]:
        """Entries in address order, from just after ``after`` (paging by key, not skip)."""
        found = self.suppressions.find({"_id": {"$gt": after}}).sort("_id", 1).limit(limit)
        return [doc async for doc in found]

    async def get_suppression(self, address: str) -> Doc | None:
        return await self.suppressions.find_one({"_id": address})

    async def seen_before(self, key: str) -> bool:
        """Whether a webhook token or batch id ``key`` was already taken."""
        return await self.webhook_seen.find_one({"_id": key}, {"_id": 1}) is not None

    async def mark_seen(self, key: str) -> bool:
        """Remember ``key`` (for :data:`SEEN_TTL_S`); False when it was already there."""
        await self.ensure_event_indexes()
        try:
            await self.webhook_seen.insert_one({"_id": key, "at": dt.datetime.now(dt.UTC)})
        except DuplicateKeyError:
            return False
        return True

    # --- outbox ---
    # The development outbox: each simulated send's MIME message, one document per send in
    # a collection named after the mails collection, so the mails never carry the bytes. The
    # bytes go in at insert (nx-27017 fails on bytes inside a $set). A mail sent twice (an
    # ambiguous failover) has two; the newest is the one shown.

    @property
    def outbox(self) -> AsyncCollection[Doc]:
        return self._named("outbox")

    @property
    def keeps_raw(self) -> bool:
        return not self.settings.production and self.settings.simulation.keep_raw

    def _keep_in_background(self, finishes: Sequence[Finish]) -> None:
        """The outbox copy is written beside the records, never before their group commit
        returns: awaited, its insert and trim were two more MongoDB writes on the consumer's
        path per commit (the records and the jobs waited for a development aid). At most
        ``OUTBOX_BACKLOG`` writes wait at once; past that a copy is skipped, and said so."""
        if not self.keeps_raw or not any(f.raw is not None for f in finishes):
            return
        self._outbox_writes = {t for t in self._outbox_writes if not t.done()}
        if len(self._outbox_writes) >= OUTBOX_BACKLOG:
            log.warning("the outbox is behind (MongoDB is slow): %d sent mail(s) kept no copy", len(finishes))
            return
        self._outbox_writes.add(asyncio.get_running_loop().create_task(self._keep_sent_raw(finishes)))

    async def _keep_sent_raw(self, finishes: Sequence[Finish]) -> None:
        """Keep the raw messages of the sends just recorded. A development aid must never hold
        up a record: a failed write is logged and the mail stays sent without its copy."""
        entries = [
            OutboxEntry(f.mail_id, f.vendor or "", f.message_id or "", f.raw)
            for f in finishes
            if f.raw is not None and f.status is Status.SENT
        ]
        if not entries or not self.keeps_raw:
            return
        try:
            await self.keep_raw(entries)
        except PyMongoError as exc:
            log.warning("the outbox kept no copy of %d sent mail(s) (%s)", len(entries), type(exc).__name__)

    async def keep_raw(self, entries: Sequence[OutboxEntry]) -> None:
        """Insert the messages, then trim the outbox to ``[simulation] keep_raw_max``."""
        if not entries:
            return
        now = dt.datetime.now(dt.UTC)
        docs = [
            {
                "mail_id": e.mail_id,
                "vendor": e.vendor,
                "message_id": e.message_id,
                "raw": e.raw,
                "stored_at": now,
            }
            for e in entries
        ]
        await self.outbox.insert_many(docs, ordered=False)
        await self._trim_outbox(len(docs))

    async def _trim_outbox(self, added: int) -> None:
        """Drop the oldest messages beyond the cap, with bounded work per write: the count comes
        from the collection's metadata (no scan) and at most ``added + OUTBOX_TRIM_SLACK`` go at
        once, so a lowered cap is reached over the next writes instead of in one long delete."""
        excess = await self.outbox.estimated_document_count() - self.settings.simulation.keep_raw_max
        if excess <= 0:
            return
        oldest = self.outbox.find({}, {"_id": 1}).sort("_id", 1).limit(min(excess, added + OUTBOX_TRIM_SLACK))
        await self.outbox.delete_many({"_id": {"$in": [d["_id"] async for d in oldest]}})

    async def outbox_raw(self, mail_id: str) -> OutboxEntry | None:
        """The newest kept message of ``mail_id``; None when none is kept (or not an id)."""
        if parse_mail_id(mail_id) is None:
            return None
        doc = await self.outbox.find_one({"mail_id": {"$eq": mail_id}}, sort=[("_id", -1)])
        if doc is None:
            return None
        return OutboxEntry(
            str(doc["mail_id"]),
            str(doc.get("vendor", "")),
            str(doc.get("message_id", "")),
            bytes(doc["raw"]),
            doc.get("stored_at"),
        )

    # --- console ---
    # The mail list is newest first by (queued_ts, _id), paged by keyset: the next page starts
    # after the last row shown, never with skip. Why queued_ts before _id: nx-27017 serves no
    # range on _id from its index (a page 1,000 rows deep into 50,000 mails took 1-4 s there)
    # while an indexed epoch field answers in milliseconds, as on MongoDB. The mails of one
    # batch share a queued_ts, so the rest of the cursor's own ts is read as that batch's ids
    # in _id order, compared here (no _id range: the same scan), reading only as many as the
    # cursor says were shown plus a page (reading the whole batch cost 100 ms there). Filters
    # use forms both servers agree on: $eq on scalars, $in for a tag (an array), $elemMatch for
    # a recipient (nx-27017 does not descend arrays in dotted paths).

    @staticmethod
    def _console_where(f: MailFilter) -> Doc:
        where: Doc = {}
        if f.status:
            where["status"] = {"$eq": f.status}
        if f.vendor:
            where["vendor"] = {"$eq": f.vendor}
        if f.tag:
            where["mail.tags"] = {"$in": [f.tag]}
        if f.recipient:
            match = {"$regex": "^" + re.escape(f.recipient)} if f.prefix else {"$eq": f.recipient}
            where["mail.to"] = {"$elemMatch": {"email": match}}
        span: Doc = {}
        if f.since_ts is not None:
            span["$gte"] = f.since_ts
        if f.until_ts is not None:
            span["$lt"] = f.until_ts
        if span:
            where["queued_ts"] = span
        return where

    async def console_page(self, f: MailFilter, *, after: Cursor | None = None, limit: int = 50) -> list[Doc]:
        """One page of list rows (no bodies, attachments or attempts), newest first."""
        where = self._console_where(f)
        rows: list[Doc] = []
        if after is not None:
            ts, last, shown = after
            rows = [] if shown < 0 else await self._console_ties(where, ts, last, shown, limit)
            span = dict(where.get("queued_ts", {}))
            span["$lt"] = min(ts, span.get("$lt", ts))
            where = {**where, "queued_ts": span}
        if len(rows) < limit:
            rows += await self._newest(where, limit - len(rows))
        return rows

    async def _newest(self, where: Doc, n: int) -> list[Doc]:
        found = self.mails.find(where, _LIST_EXCLUDED).sort(_NEWEST_FIRST).limit(n)
        return [doc async for doc in found]

    async def _console_ties(self, where: Doc, ts: float, last: ObjectId, shown: int, limit: int) -> list[Doc]:
        """The rows queued at the cursor's own ``ts`` that come after it: ids first, newest
        first, ``shown + limit`` of them (more, doubling, when ``shown`` undercounts: the ids
        decide what comes after ``last``, the count only how much to read), then those rows."""
        same: Doc = {**where, "queued_ts": {"$eq": ts}}
        want = max(shown, 0) + limit
        while True:
            read = self.mails.find(same, {"_id": 1}).sort("_id", -1).limit(want + 1)
            got = [d["_id"] async for d in read]
            ids = [oid for oid in got if oid < last][:limit]
            if len(ids) == limit or len(got) <= want:
                break
            want *= 2
        if not ids:
            return []
        found = {d["_id"]: d async for d in self.mails.find({"_id": {"$in": ids}}, _LIST_EXCLUDED)}
        return [found[i] for i in ids if i in found]

    @staticmethod
    def next_cursor(rows: Sequence[Doc], after: Cursor | None, following: Doc | None) -> Cursor | None:
        """The cursor after ``rows`` (a page that followed ``after``), None for no rows;
        ``following`` is the first row of the next page (read one beyond the page): when its
        queued_ts differs, no read of the last batch's ids is needed at all."""
        if not rows:
            return None
        ts = float(rows[-1].get("queued_ts") or 0.0)
        if following is None or float(following.get("queued_ts") or 0.0) != ts:
            return ts, rows[-1]["_id"], -1
        shown = sum(1 for r in rows if float(r.get("queued_ts") or 0.0) == ts)
        if after is not None and after[0] == ts and after[2] >= 0:
            shown += after[2]
        return ts, rows[-1]["_id"], shown

    async def failed_mails(self, limit: int) -> list[Doc]:
        """The newest failed mails as list rows: the console asks beanstalkd which of their jobs
        are buried (a mail that ran out of rounds leaves its job buried)."""
        where = {"status": {"$eq": Status.FAILED.value}}
        return [d async for d in self.mails.find(where, _LIST_EXCLUDED).sort(_NEWEST_FIRST).limit(limit)]

    async def retry_failed(self, oid: ObjectId) -> Doc | None:
        """Compare-and-set failed -> queued with a fresh round count, so the mail gets its full
        rounds again; the caller queues a job for it. None when the mail is not failed."""
        return await self.mails.find_one_and_update(
            {"_id": oid, "status": {"$eq": Status.FAILED.value}},
            {
                "$set": {
                    "status": Status.QUEUED.value,
                    "rounds": 0,
                    "lease_until": 0.0,
                    "next_attempt_ts": time.time(),
                },
                "$currentDate": {"updated_at": True},
            },
            projection={"priority": 1, "job_id": 1},
            return_document=ReturnDocument.AFTER,
        )


def to_record(doc: Doc) -> MailRecord:
    """The stored document as the public record model."""
    return MailRecord(
        id=str(doc["_id"]),
        status=Status(doc["status"]),
        email=Email.from_stored(doc["mail"]),
        created_at=doc["created_at"],
        updated_at=doc.get("updated_at") or doc["created_at"],
        job_id=doc.get("job_id"),
        rounds=int(doc.get("rounds", 0)),
        attempts=[Attempt.model_validate(a) for a in doc.get("attempts", [])],
        vendor=doc.get("vendor"),
        message_id=doc.get("message_id"),
        sent_at=doc.get("sent_at"),
        error=doc.get("error"),
        idempotency_key=doc.get("idempotency_key"),
    )
