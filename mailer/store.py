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

import datetime as dt
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import AsyncMongoClient, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from mailer.config import Settings
from mailer.errors import MailNotFound, StoreError
from mailer.lifecycle import AsyncResource
from mailer.models import Attempt, Email, MailRecord, Status

Doc = dict[str, Any]
_CLAIMABLE = [Status.QUEUED.value, Status.RETRYING.value]


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


class ClaimState(Enum):
    CLAIMED = "claimed"  # ours now: deliver it
    MISSING = "missing"  # no such document: a poison job
    DONE = "done"  # already sent or failed: a redelivery, send nothing
    BUSY = "busy"  # another consumer holds a live lease: a twin job
    ERROR = "error"  # this document could not be judged (``error`` says why); the batch goes on
    CORRUPT = "corrupt"  # a status mailer never writes (or none): a poison job


@dataclass(slots=True)
class Claim:
    state: ClaimState
    doc: Doc | None = None
    error: Exception | None = None

    @property
    def email(self) -> Email:
        assert self.doc is not None
        return Email.from_stored(self.doc["mail"])


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
    # The claimer: a retry or failure is only written while it still holds the claim (if its
    # lease was taken over, the new holder's outcome stands). A send is always written.
    consumer: str | None = None
    extra: Doc = field(default_factory=dict)


def _claim_update(consumer: str, lease_s: float, *, job_id: int | None = None, token: str = "") -> Doc:
    fields: Doc = {
        "status": Status.SENDING.value,
        "consumer": consumer,
        "claim": token,
        "lease_until": time.time() + lease_s,
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

    def __init__(self, settings: Settings, *, client: AsyncMongoClient[Doc] | None = None) -> None:
        self.settings = settings
        self._own_client = client is None
        self._client = client
        self._mails: AsyncCollection[Doc] | None = None
        self._vendors: AsyncCollection[Doc] | None = None

    def __repr__(self) -> str:
        m = self.settings.mongodb
        return f"<MailStore collection={m.collection!r} connected={self._mails is not None}>"

    # --- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        if self._mails is not None:
            return
        m = self.settings.mongodb
        if self._client is None:
            self._client = AsyncMongoClient(
                m.uri.get_secret_value(),
                tz_aware=True,
                tzinfo=dt.UTC,
                timeoutMS=m.timeout_ms,
                serverSelectionTimeoutMS=m.timeout_ms,
                connectTimeoutMS=m.timeout_ms,
                appname="mailer",
            )
        db = self._client.get_default_database(default=m.database or "mailer")
        if m.database:
            db = self._client[m.database]
        self._mails = db[m.collection]
        self._vendors = db[m.vendor_status_collection]
        try:
            await self.ensure_indexes()
        except PyMongoError as exc:
            await self.close()
            raise StoreError(
                f"cannot reach MongoDB ({type(exc).__name__}): check mongodb.uri and that the server "
                "is running ('make services' starts the local one)"
            ) from None

    async def ensure_indexes(self) -> None:
        await self.mails.create_index("idempotency_key", unique=True, sparse=True)
        await self.mails.create_index("status")

    async def close(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.close()
            self._client = None
        self._mails = self._vendors = None

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
        now = dt.datetime.now(dt.UTC)
        doc: Doc = {
            "_id": ObjectId(),
            "status": Status.QUEUED.value,
            "mail": email.model_dump(mode="python", exclude_none=True),
            "priority": priority,
            "created_at": now,
            "updated_at": now,
            "rounds": 0,
            "attempts": [],
            "job_id": None,
            "lease_until": 0.0,
            "next_attempt_ts": time.time() + email.delay_seconds(now),
            "requeued_ts": None,
        }
        if email.idempotency_key is not None:
            # Only when set: the unique index is sparse, so absent keys never collide.
            doc["idempotency_key"] = email.idempotency_key
        return doc

    async def insert(self, doc: Doc) -> tuple[str, bool]:
        """Insert one new mail; ``(id, False)`` when its idempotency key was already used."""
        try:
            await self.mails.insert_one(doc)
        except DuplicateKeyError:
            existing = await self._by_key(doc.get("idempotency_key"))
            if existing is None:
                raise
            return existing, False
        return str(doc["_id"]), True

    async def insert_many(self, docs: Sequence[Doc]) -> list[tuple[str, bool] | StoreError]:
        """One unordered ``insert_many``; per doc ``(id, new)`` or the error for that doc alone.

        A doc whose idempotency key is known gets the existing id and ``new=False``. Errors of
        the whole call (MongoDB unreachable) raise: it is then unknown which docs were stored.
        """
        if not docs:
            return []
        refused: dict[int, Doc] = {}
        try:
            await self.mails.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            refused = {int(err["index"]): err for err in exc.details.get("writeErrors", [])}
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

    async def _by_key(self, key: str | None) -> str | None:
        if key is None:
            return None
        found = await self.mails.find_one({"idempotency_key": {"$eq": key}}, {"_id": 1})
        return None if found is None else str(found["_id"])

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

    # --- the deliver path --------------------------------------------------------------

    async def claim(self, oid: ObjectId, *, job_id: int, consumer: str, lease_s: float) -> Claim:
        """Take a mail for delivery in one atomic ``find_one_and_update`` that returns it.

        Claimable: queued/retrying, or sending under a lease that has run out (its consumer
        died). The common case is one round trip; only when it fails is the document read
        again, to tell why or to take over an expired lease. (The two cases are separate
        queries, not one ``$or``: nx-27017 answers an ``$or`` with a collection scan.)
        """
        doc = await self.mails.find_one_and_update(
            {"_id": oid, "status": {"$in": _CLAIMABLE}},
            _claim_update(consumer, lease_s, job_id=job_id),
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            return Claim(ClaimState.CLAIMED, doc)
        current = await self.mails.find_one({"_id": oid}, {"status": 1, "lease_until": 1, "job_id": 1})
        return await self._explain(oid, current, job_id=job_id, consumer=consumer, lease_s=lease_s)

    async def _take_over(self, oid: ObjectId, *, job_id: int, consumer: str, lease_s: float) -> Claim:
        """Claim a mail whose consumer died: its lease ran out while it was ``sending``."""
        doc = await self.mails.find_one_and_update(
            {"_id": oid, "status": {"$eq": Status.SENDING.value}, "lease_until": {"$lt": time.time()}},
            _claim_update(consumer, lease_s, job_id=job_id),
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            return Claim(ClaimState.CLAIMED, doc)
        # Someone else changed it meanwhile: look again.
        return await self.claim(oid, job_id=job_id, consumer=consumer, lease_s=lease_s)

    async def claim_many(
        self, requests: Sequence[tuple[ObjectId, int]], *, consumer: str, lease_s: float
    ) -> list[Claim]:
        """Claim many mails in two round trips: one ``update_many`` and one ``find``.

        Per request ``(mail id, job id)`` the same answer as :meth:`claim`. The update stamps
        a token unique to this call, so each document tells by itself whether this call won
        it (the update is atomic per document, like a ``find_one_and_update``). The job id is
        written with the delivery's record instead (one value per document does not fit one
        ``update_many``). A second job for the same mail in the same batch is a twin.
        """
        if not requests:
            return []
        token = uuid.uuid4().hex
        oids = list({oid: None for oid, _ in requests})
        await self.mails.update_many(
            {"_id": {"$in": oids}, "status": {"$in": _CLAIMABLE}},
            _claim_update(consumer, lease_s, token=token),
        )
        found = {doc["_id"]: doc async for doc in self.mails.find({"_id": {"$in": oids}})}
        claims: list[Claim] = []
        won: set[ObjectId] = set()
        for oid, job_id in requests:
            doc = found.get(oid)
            if doc is not None and doc.get("claim") == token and oid not in won:
                won.add(oid)
                doc["job_id"] = job_id
                claims.append(Claim(ClaimState.CLAIMED, doc))
            elif doc is not None and oid in won:
                claims.append(Claim(ClaimState.BUSY, doc))
            else:
                try:
                    claims.append(
                        await self._explain(oid, doc, job_id=job_id, consumer=consumer, lease_s=lease_s)
                    )
                except PyMongoError:
                    raise
                except Exception as exc:  # this document's own problem: not the whole batch's
                    claims.append(Claim(ClaimState.ERROR, doc, error=exc))
        return claims

    async def _explain(
        self, oid: ObjectId, current: Doc | None, *, job_id: int, consumer: str, lease_s: float
    ) -> Claim:
        """Why a mail could not be claimed, taking over an expired lease on the way."""
        if current is None:
            return Claim(ClaimState.MISSING)
        status = current.get("status")
        if status in (Status.SENT.value, Status.FAILED.value):
            return Claim(ClaimState.DONE, current)
        if status not in _CLAIMABLE and status != Status.SENDING.value:
            return Claim(ClaimState.CORRUPT, current)
        if status == Status.SENDING.value and float(current.get("lease_until", 0)) < time.time():
            return await self._take_over(oid, job_id=job_id, consumer=consumer, lease_s=lease_s)
        return Claim(ClaimState.BUSY, current)

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
        if f.consumer is not None and f.status is not Status.SENT:
            where["consumer"] = {"$eq": f.consumer}
            where["status"] = {"$eq": Status.SENDING.value}
        return UpdateOne(where, {"$set": fields, "$currentDate": dates})

    async def finish_many(self, finishes: Iterable[Finish]) -> None:
        """Write many delivery results in one ``bulk_write`` (the consumer's group commit)."""
        ops = [self._finish_op(f) for f in finishes]
        if ops:
            await self.mails.bulk_write(ops, ordered=False)

    async def release_claim(self, oid: ObjectId, status: Status = Status.QUEUED) -> None:
        """Give an unfinished claim back (shutdown) so the next consumer can take it at once."""
        await self.mails.update_one(
            {"_id": oid, "status": {"$eq": Status.SENDING.value}},
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
        self, *, older_than_s: float, now: float | None = None, limit: int = 10000
    ) -> list[Doc]:
        """Mails no live job may deliver: queued or retrying mails whose time to go came
        more than ``older_than_s`` ago, and sending mails whose claim lease ran out.

        One query per status, each an indexed ``$eq`` (an ``$or`` would scan on nx-27017).
        """
        now = time.time() if now is None else now
        cutoff = now - older_than_s
        projection = {"_id": 1, "status": 1, "priority": 1, "next_attempt_ts": 1, "requeued_ts": 1}
        queries: list[Doc] = [
            {"status": {"$eq": Status.QUEUED.value}, "next_attempt_ts": {"$lt": cutoff}},
            {"status": {"$eq": Status.RETRYING.value}, "next_attempt_ts": {"$lt": cutoff}},
            {"status": {"$eq": Status.SENDING.value}, "lease_until": {"$lt": now}},
        ]
        found: list[Doc] = []
        for query in queries:
            cursor = self.mails.find(query, projection).limit(max(1, limit - len(found)))
            found.extend([doc async for doc in cursor])
            if len(found) >= limit:
                break
        return found

    async def mark_requeued(self, oid: ObjectId, *, expected_ts: float | None, now: float) -> bool:
        """Stamp a requeue; the compare-and-set makes two sweeps at once requeue a mail once."""
        result = await self.mails.update_one(
            {"_id": oid, "requeued_ts": {"$eq": expected_ts}},
            {"$set": {"requeued_ts": now, "next_attempt_ts": now}},
        )
        return result.modified_count == 1


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
