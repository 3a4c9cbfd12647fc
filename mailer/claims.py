"""The claim state machine: who may deliver a mail, and what a job whose claim failed means.

A claim marks a mail ``sending`` under a lease (``lease_until``, epoch seconds) and a token of
its own (``claim``). The store performs the atomic steps (:meth:`MailStore.claim_one`,
:meth:`~MailStore.claim_all`, :meth:`~MailStore.take_over`); this module decides between them:

- claimable (queued or retrying): the claim takes it, in one round trip;
- ``sending`` under a lease that ran out (its consumer died), or under a claim of this very
  consumer that it no longer works on (its claim was applied but the reply was lost): taken
  over by a compare-and-set on the claim token that was seen, so two takers cannot both win;
- ``sending`` under a live lease of another claim: ``BUSY`` (the job is a twin, or its own
  consumer is still at it);
- still claimable after ``CLAIM_TRIES`` claims that did not take: ``UNCLAIMED``, never ``BUSY``.
  Either MongoDB is not applying writes (nx-27017 answers a ``find_one_and_update`` on a full
  disk with no match and no error) or others keep winning and releasing it. The job must be
  kept: a ``BUSY`` job may be deleted as a twin, which would leave the mail to the sweep.

Every path is bounded: no recursion, at most ``CLAIM_TRIES`` writes after the first.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from enum import Enum

from bson import ObjectId
from pymongo.errors import PyMongoError

from mailer.batching import Batcher
from mailer.beanstalk import Job
from mailer.models import Email, Status
from mailer.store import Doc, MailStore, parse_mail_id

_CLAIMABLE = (Status.QUEUED.value, Status.RETRYING.value)
_FINISHED = (Status.SENT.value, Status.FAILED.value, Status.CANCELLED.value)
CLAIM_TRIES = 3
Clock = Callable[[], float]


class ClaimState(Enum):
    CLAIMED = "claimed"  # ours now: deliver it
    MISSING = "missing"  # no such document: a poison job
    DONE = "done"  # already sent, failed or cancelled: a redelivery, send nothing
    BUSY = "busy"  # another claim holds a live lease: a twin job
    UNCLAIMED = "unclaimed"  # claimable, yet claims did not take: keep the job, try later
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
class Held:
    """A claim this process holds, from the claim until its job is settled or handed back."""

    oid: ObjectId
    job_id: int
    token: str  # the claim's own token: records and fences match on it
    priority: int
    claimed_at: float  # monotonic; renewed by a fence
    sending_since: float | None = None  # monotonic, while a vendor has the request
    # The round's attempts with an ``unknown`` one for a send cut off at shutdown.
    interrupted: list[Doc] | None = None


async def claim(
    store: MailStore,
    oid: ObjectId,
    *,
    job_id: int,
    consumer: str,
    lease_s: float,
    now: float | None = None,
    active: Container[ObjectId] = (),
) -> Claim:
    """Claim one mail (see the module docstring); ``active`` names the mails this consumer
    is delivering right now (a claim of its own on any other mail is an abandoned one)."""
    doc = await store.claim_one(
        oid, job_id=job_id, consumer=consumer, token=uuid.uuid4().hex, lease_s=lease_s, now=now
    )
    if doc is not None:
        return Claim(ClaimState.CLAIMED, doc)
    return await _again(
        store, oid, None, job_id=job_id, consumer=consumer, lease_s=lease_s, now=now, active=active
    )


async def claim_many(
    store: MailStore,
    requests: Sequence[tuple[ObjectId, int]],
    *,
    consumer: str,
    lease_s: float,
    now: float | None = None,
    active: Container[ObjectId] = (),
) -> list[Claim]:
    """Claim many mails in two round trips (:meth:`MailStore.claim_all`); per request ``(mail
    id, job id)`` the same answer as :func:`claim`. The token is unique to this call, so each
    document tells by itself whether this call won it. A second job for the same mail in the
    same batch is a twin."""
    if not requests:
        return []
    token = uuid.uuid4().hex
    oids = list({oid: None for oid, _ in requests})
    found = await store.claim_all(oids, consumer=consumer, token=token, lease_s=lease_s, now=now)
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
                    await _again(
                        store,
                        oid,
                        doc,
                        job_id=job_id,
                        consumer=consumer,
                        lease_s=lease_s,
                        now=now,
                        active=active,
                    )
                )
            except PyMongoError:
                raise
            except Exception as exc:  # this document's own problem: not the whole batch's
                claims.append(Claim(ClaimState.ERROR, doc, error=exc))
    return claims


async def _again(
    store: MailStore,
    oid: ObjectId,
    current: Doc | None,
    *,
    job_id: int,
    consumer: str,
    lease_s: float,
    now: float | None,
    active: Container[ObjectId],
) -> Claim:
    """The claim did not take: read why, take over what may be taken, at most CLAIM_TRIES times."""
    for _ in range(CLAIM_TRIES):
        if current is None:
            current = await store.claim_view(oid)
        if current is None:
            return Claim(ClaimState.MISSING)
        status = current.get("status")
        if status in _FINISHED:
            return Claim(ClaimState.DONE, current)
        if status not in _CLAIMABLE and status != Status.SENDING.value:
            return Claim(ClaimState.CORRUPT, current)
        token = uuid.uuid4().hex
        if status == Status.SENDING.value:
            t = time.time() if now is None else now
            expired = float(current.get("lease_until", 0)) < t
            abandoned = current.get("consumer") == consumer and oid not in active
            if not (expired or abandoned):
                return Claim(ClaimState.BUSY, current)
            doc = await store.take_over(
                oid,
                seen=current.get("claim"),
                job_id=job_id,
                consumer=consumer,
                token=token,
                lease_s=lease_s,
                now=now,
            )
        else:
            doc = await store.claim_one(
                oid, job_id=job_id, consumer=consumer, token=token, lease_s=lease_s, now=now
            )
        if doc is not None:
            return Claim(ClaimState.CLAIMED, doc)
        current = None  # someone else changed it meanwhile (or the write did not apply)
    return Claim(ClaimState.UNCLAIMED, current)


class Claimer:
    """Claims for many loops in one ``update_many`` + ``find`` (see :func:`claim_many`), and
    the claims this process holds.

    One ``find_one_and_update`` per mail costs the client and nx-27017 several times more
    CPU than a shared claim of the jobs reserved meanwhile. ``held`` is filled the moment a
    batch's answer arrives, before any caller runs on, so a twin job of a mail another loop
    just won is never mistaken for an abandoned claim of ours.
    """

    def __init__(
        self,
        store: MailStore,
        *,
        consumer_id: str,
        lease_s: float,
        default_priority: int,
        batch: int = 200,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self.store = store
        self.consumer_id = consumer_id
        self.lease_s = lease_s
        self.default_priority = default_priority
        self.clock = clock
        self.monotonic = monotonic
        self.held: dict[ObjectId, Held] = {}
        self._batcher: Batcher[tuple[ObjectId, int], Claim] = Batcher(self._write, max_batch=batch)

    async def _write(self, requests: list[tuple[ObjectId, int]]) -> list[Claim]:
        now, me, lease, held = self.clock(), self.consumer_id, self.lease_s, self.held
        if len(requests) == 1:  # one round trip instead of two when the load is light
            oid, job_id = requests[0]
            claims = [
                await claim(self.store, oid, job_id=job_id, consumer=me, lease_s=lease, now=now, active=held)
            ]
        else:
            claims = await claim_many(self.store, requests, consumer=me, lease_s=lease, now=now, active=held)
        for (oid, job_id), result in zip(requests, claims, strict=True):
            if result.state is ClaimState.CLAIMED and result.doc is not None:
                priority = int(result.doc.get("priority", self.default_priority))
                self.held[oid] = Held(oid, job_id, str(result.doc.get("claim")), priority, self.monotonic())
        return claims

    async def claim(self, oid: ObjectId, job_id: int) -> Claim:
        return await self._batcher.submit((oid, job_id))

    def holding(self, job: Job) -> Held | None:
        """This job's claim, if this process holds one for it."""
        oid = parse_mail_id(job.body)
        held = None if oid is None else self.held.get(oid)
        return held if held is not None and held.job_id == job.id else None

    def forget(self, job: Job) -> Held | None:
        """The job is settled or handed back: its claim (if this job held one) is no longer ours."""
        held = self.holding(job)
        if held is not None:
            del self.held[held.oid]
        return held
