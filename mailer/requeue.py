"""The reconciler: put mails back on the tube that no live job can deliver any more.

MongoDB is the source of truth; beanstalkd only carries ids. A job can go missing (the
producer's put failed after the insert, beanstalkd lost its binlog, a job was deleted by
hand), and a claim can be orphaned (its consumer died and the job was lost too). The sweep
finds such mails and queues their ids again. A duplicate job is harmless — the consumer's
atomic claim lets only one job deliver a mail, the other is deleted unsent — but the sweep
still avoids doubling a healthy backlog: a mail is only an orphan if it is older than the
oldest job still waiting in the tube (plus the threshold), since consumers have not even
reached jobs of that age yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.errors import BeanstalkServerError, NotFound
from mailer.store import MailStore

log = logging.getLogger("mailer.requeue")


@dataclass
class SweepReport:
    found: int = 0
    requeued: list[str] = field(default_factory=list)
    skipped: int = 0  # another sweep got there first
    threshold_s: float = 0.0
    backlog_age_s: float = 0.0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would requeue" if self.dry_run else "requeued"
        return (
            f"{verb} {len(self.requeued)} of {self.found} orphaned mail(s) "
            f"(threshold {self.threshold_s:.0f} s, oldest waiting job {self.backlog_age_s:.0f} s old"
            + (f", {self.skipped} taken by another sweep" if self.skipped else "")
            + ")"
        )


async def backlog_age(queue: Beanstalk, tube: str) -> float:
    """Age in seconds of the job consumers will reserve next from ``tube`` (0 when empty)."""
    await queue.use(tube)
    job = await queue.peek_ready()
    if job is None:
        return 0.0
    try:
        stats = await queue.stats_job(job.id)
    except NotFound:  # reserved or deleted between the two commands
        return 0.0
    return float(stats.get("age", 0))


async def sweep(
    settings: Settings,
    store: MailStore,
    queue: Beanstalk,
    *,
    older_than_s: float,
    dry_run: bool = False,
    limit: int = 10000,
) -> SweepReport:
    """Find orphaned mails and put their ids on the tube again (safe to run concurrently)."""
    tube = settings.beanstalkd.tube
    age = await backlog_age(queue, tube)
    threshold = max(older_than_s, age + 1.0 if age else 0.0)
    now = time.time()
    orphans = await store.find_orphans(older_than_s=threshold, now=now, limit=limit)
    report = SweepReport(found=len(orphans), threshold_s=threshold, backlog_age_s=age, dry_run=dry_run)
    for doc in orphans:
        mail_id = str(doc["_id"])
        if dry_run:
            report.requeued.append(mail_id)
            continue
        # Compare-and-set first: of two sweeps that saw the same document, one wins.
        if not await store.mark_requeued(doc["_id"], expected_ts=doc.get("requeued_ts"), now=now):
            report.skipped += 1
            continue
        try:
            await queue.put(
                mail_id.encode(),
                priority=int(doc.get("priority", settings.producer.default_priority)),
                ttr=settings.beanstalkd.ttr_s,
            )
        except BeanstalkServerError as exc:
            # Marked but not queued: the next sweep finds it again once it is old enough.
            log.error("could not requeue mail %s: %s", mail_id, exc)
            continue
        report.requeued.append(mail_id)
    if report.requeued and not dry_run:
        log.warning("requeue: %s", report.summary())
    return report
