"""The reconciler: put mails back on the tube that no live job can deliver any more.

MongoDB is the source of truth; beanstalkd only carries ids. A job can go missing (the
producer's put failed after the insert, beanstalkd lost its binlog, a job was deleted by
hand), and a claim can be orphaned (its consumer died and the job was lost too). The sweep
finds such mails and queues their ids again.

Why the sweep is exact (it never requeues a mail whose job is in beanstalkd)
-----------------------------------------------------------------------------
Time cannot prove it. The age of the job at the head of ``peek-ready`` bounds nothing: with
priorities a young urgent job sits in front of old ones, delayed, reserved and buried jobs
are not in ``peek-ready`` at all, and the stamps on a document are taken before its insert
and its put, so a backlog's jobs are always younger than its documents. So the sweep asks
beanstalkd about each candidate's own job, by id, and compares the body:

1. Every job mailer creates for a mail is recorded with its id. The producer writes, after
   each batch's puts, one receipt ``{mail id: job id}`` on one document of the batch (the
   ``batch`` field of every mail names that document): one small write per batch, none per
   mail. The sweep records the jobs it puts on each document (``job_id``, one
   ``bulk_write``), and the consumer's ``job_id`` is the job it reserved, one of those.
2. beanstalkd keeps a job under one id until it is deleted (a release, bury, kick or the
   TTR keep it; its state does not matter), and ``peek <id>`` finds a job in any state,
   ready, delayed, reserved or buried. After a restart without binlog, ids start again,
   so an id may name another mail's job: the body (the mail id) tells them apart.
3. Hence if no recorded job of a mail is found with its body, no job mailer created for
   it exists any more. Candidates whose latest writer may still be between its insert or
   compare-and-set and its receipt (no receipt yet, or a requeue, within
   :func:`in_flight_s`) are left for a later sweep instead of being judged.
4. A requeue is a compare-and-set per document on what the sweep read (its ``requeued_ts``
   and that it is still claimable or still under an expired lease), grouped into one
   ``update_many`` per chunk with a token unique to the sweep: of two sweeps, one wins each
   mail; the other puts nothing for it.

What is not covered, and why it is harmless: a job whose id was never recorded, i.e. the
first put of a producer that lost its connection and put again, or a batch whose receipt
write failed or whose writer died between its puts and its receipt. Such a mail may get one
job too many; the consumer's atomic claim lets only one job deliver it, the other is deleted
unsent.

With several beanstalkd servers (:mod:`mailer.fleet`) a recorded job id names its server
too, and each peek goes to that server. A server that cannot be reached counts as having lost
its jobs (while at least one other answers): its mails are put on the others. If it comes back
with its binlog, its jobs are twins, and the claim still lets only one job deliver each mail
(a twin finds the mail sent, or under another live claim, and is deleted).

The work is batched: candidates come in chunks of 1,000, their receipts in one ``find``,
their jobs in pipelined ``peek``s, the compare-and-set in one ``update_many``, the new jobs
in one pipelined ``put_many`` and their ids in one ``bulk_write``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.fleet import Fleet
from mailer.store import RECEIPT_DELAY_S, Doc, MailStore

log = logging.getLogger("mailer.requeue")


@dataclass
class SweepReport:
    found: int = 0  # orphans: no job of theirs is in beanstalkd
    requeued: list[str] = field(default_factory=list)
    live: int = 0  # candidates whose job is still in beanstalkd
    in_flight: int = 0  # candidates whose producer or sweep may still be writing
    skipped: int = 0  # another sweep got there first
    threshold_s: float = 0.0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would requeue" if self.dry_run else "requeued"
        return (
            f"{verb} {len(self.requeued)} of {self.found} orphaned mail(s) "
            f"({self.live} with a live job, threshold {self.threshold_s:.0f} s"
            + (f", {self.in_flight} still being written" if self.in_flight else "")
            + (f", {self.skipped} taken by another sweep" if self.skipped else "")
            + ")"
        )


def in_flight_s(settings: Settings) -> float:
    """How long a writer may take from stamping a document to recording its job: an insert,
    a put with one reconnect, and the receipt, each bounded by its timeout (the producer's
    MongoDB writes twice: pymongo may retry one once), plus the time a lone send's receipt
    may wait for its epoch's (``RECEIPT_DELAY_S``)."""
    b, m = settings.beanstalkd, settings.mongodb
    return 4 * m.timeout_ms / 1000 + b.connect_timeout_s + 3 * b.command_timeout_s + RECEIPT_DELAY_S + 5.0


async def sweep(
    settings: Settings,
    store: MailStore,
    queue: Fleet | Beanstalk,
    *,
    older_than_s: float,
    dry_run: bool = False,
    limit: int | None = None,
    now: float | None = None,
) -> SweepReport:
    """Find orphaned mails and put their ids on the tube again (safe to run concurrently).

    ``older_than_s`` only narrows the candidates (mails whose time to go came that long
    ago); whether a candidate is an orphan is asked of beanstalkd (see the module's
    docstring). ``limit`` caps the mails requeued by one sweep. ``queue`` is every server
    (a lone :class:`Beanstalk` connection is the one server).
    """
    now = time.time() if now is None else now
    fleet = queue if isinstance(queue, Fleet) else Fleet([queue])
    await fleet.use(settings.beanstalkd.tube)
    token = uuid.uuid4().hex
    report = SweepReport(threshold_s=older_than_s, dry_run=dry_run)
    async for chunk in store.find_orphans(older_than_s=older_than_s, now=now):
        orphans = await _orphans(store, fleet, chunk, now=now, bound=in_flight_s(settings), report=report)
        if limit is not None:
            orphans = orphans[: max(0, limit - len(report.requeued))]
        report.found += len(orphans)
        if dry_run:
            report.requeued.extend(str(d["_id"]) for d in orphans)
        elif orphans:
            await _requeue(settings, store, fleet, orphans, token=token, now=now, report=report)
        if limit is not None and len(report.requeued) >= limit:
            break
    if report.requeued and not dry_run:
        log.warning("requeue: %s", report.summary())
    return report


def _recorded_jobs(doc: Doc, receipts: dict[str, dict[str, int] | None]) -> list[int]:
    """Every job id recorded for this mail: its batch's receipt and its own ``job_id``."""
    jobs: list[int] = []
    receipt = receipts.get(str(doc.get("batch")))
    if receipt is not None and (job := receipt.get(str(doc["_id"]))) is not None:
        jobs.append(job)
    if isinstance(doc.get("job_id"), int) and doc["job_id"] not in jobs:
        jobs.append(int(doc["job_id"]))
    return jobs


def _being_written(doc: Doc, receipts: dict[str, dict[str, int] | None], now: float, bound: float) -> bool:
    """Whether the writer of this mail's latest job may not have recorded it yet."""
    requeued = doc.get("requeued_ts")
    if isinstance(requeued, (int, float)) and requeued > now - bound:
        return True
    batch = doc.get("batch")
    if batch is None or receipts.get(str(batch)) is not None:
        return False
    return float(doc.get("queued_ts") or 0.0) > now - bound


async def _live_jobs(queue: Fleet, wanted: Sequence[tuple[str, int]]) -> set[str]:
    """The mail ids of ``(mail id, job id)`` pairs whose job beanstalkd still holds, in any
    state, with that mail's id as its body. The peeks are pipelined, each on its server."""
    jobs = await queue.peek_all([job_id for _, job_id in wanted])
    return {
        mail_id
        for (mail_id, _), job in zip(wanted, jobs, strict=True)
        if job and job.body == mail_id.encode()
    }


async def _orphans(
    store: MailStore, queue: Fleet, chunk: list[Doc], *, now: float, bound: float, report: SweepReport
) -> list[Doc]:
    """The candidates of ``chunk`` no job in beanstalkd can deliver."""
    receipts = await store.receipts(str(d["batch"]) for d in chunk if d.get("batch"))
    judged: list[Doc] = []
    wanted: list[tuple[str, int]] = []
    for doc in chunk:
        if _being_written(doc, receipts, now, bound):
            report.in_flight += 1
            continue
        judged.append(doc)
        wanted.extend((str(doc["_id"]), job) for job in _recorded_jobs(doc, receipts))
    live = await _live_jobs(queue, wanted)
    report.live += len(live)
    return [d for d in judged if str(d["_id"]) not in live]


async def _requeue(
    settings: Settings,
    store: MailStore,
    queue: Fleet,
    orphans: list[Doc],
    *,
    token: str,
    now: float,
    report: SweepReport,
) -> None:
    """Compare-and-set, then one pipelined put per priority, then the new jobs' ids."""
    won = await store.mark_requeued(orphans, token=token, now=now)
    report.skipped += len(orphans) - len(won)
    by_priority: dict[int, list[str]] = {}
    for doc in orphans:
        if doc["_id"] in won:
            priority = int(doc.get("priority", settings.producer.default_priority))
            by_priority.setdefault(priority, []).append(str(doc["_id"]))
    jobs: dict[str, int] = {}
    for priority, ids in by_priority.items():
        # Each on its mail's own server, or the next one that answers (see mailer.fleet).
        puts = await queue.put_many(ids, priority=priority, ttr=settings.beanstalkd.ttr_s)
        for mail_id, put in zip(ids, puts, strict=True):
            if isinstance(put, int):
                jobs[mail_id] = put
            else:  # marked, not queued: a sweep after the in-flight bound finds it again
                log.error("could not requeue mail %s: %s", mail_id, put)
    await store.record_job_ids(jobs)
    report.requeued.extend(jobs)
