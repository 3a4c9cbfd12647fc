"""The one owner of a reserved job, from reserve to delete, release or bury.

beanstalkd lets only the connection that reserved a job touch, delete, release or bury it,
so that connection and the job travel together in an :class:`OwnedJob`, and every way a job
can end is one of its methods: :meth:`~OwnedJob.finish` carries out a delivery
:class:`~mailer.delivery.Decision` (after its record is acknowledged), :meth:`~OwnedJob.hand_back`
gives it back on shutdown (claim released, job released at the mail's own priority),
:meth:`~OwnedJob.drop` leaves it to beanstalkd when its connection failed. Delivery decides;
the owner acts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from bson import ObjectId

from mailer.beanstalk import Beanstalk, Job
from mailer.delivery import Action, Decision, Delivery, Ready
from mailer.errors import BeanstalkError, NotFound
from mailer.fleet import fleet_job_id
from mailer.store import parse_mail_id

log = logging.getLogger("mailer.jobs")


class OwnedJob:
    """A reserved job, its reserving connection, and the delivery that decides its fate.

    ``job`` is the job as the rest of mailer knows it, by its fleet job id (server ``server``
    of ``beanstalkd.servers``, see :mod:`mailer.fleet`); the commands to its own server use
    that server's id, ``local_id``.
    """

    __slots__ = ("delivery", "job", "local_id", "monotonic", "oid", "queue", "started", "touched")

    def __init__(
        self,
        job: Job,
        queue: Beanstalk,
        delivery: Delivery,
        *,
        server: int = 0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local_id = job.id
        self.job = job if server == 0 else Job(fleet_job_id(server, job.id), job.body)
        self.queue = queue
        self.delivery = delivery
        self.oid: ObjectId | None = parse_mail_id(job.body)
        self.monotonic = monotonic
        self.started = self.touched = monotonic()

    def __repr__(self) -> str:
        return f"<OwnedJob {self.job.id} mail={self.oid}>"

    @property
    def id(self) -> int:
        return self.job.id

    @property
    def priority(self) -> int:
        """The mail's own priority once claimed; the default before."""
        held = self.delivery.claimer.holding(self.job)
        return held.priority if held is not None else self.delivery.default_priority

    def at_vendor(self) -> bool:
        """Whether a vendor has this job's mail right now (a stop must wait for it)."""
        held = self.delivery.claimer.holding(self.job)
        return held is not None and held.sending_since is not None

    async def prepare(self) -> Decision | Ready:
        return await self.delivery.prepare(self.job)

    async def finish(self, decision: Decision) -> None:
        """Carry out ``decision``: only once its record is acknowledged."""
        if decision.recording is not None:
            await asyncio.shield(decision.recording)
        job, queue, local = self.job, self.queue, self.local_id
        try:
            if decision.action is Action.DELETE:
                await queue.delete(local)
            elif decision.action is Action.RELEASE:
                await queue.release(local, priority=decision.priority, delay=decision.delay)
            elif decision.action is Action.TWIN:
                if await self._reserved_before():
                    log.info(
                        "job %s: mail %s is still leased; trying again in %d s",
                        job.id,
                        self.oid,
                        decision.delay,
                    )
                    await queue.release(local, priority=decision.priority, delay=decision.delay)
                else:
                    log.info(
                        "job %s: mail %s is being delivered under another job; deleting this twin",
                        job.id,
                        self.oid,
                    )
                    await queue.delete(local)
            else:
                await queue.bury(local, priority=decision.priority)
        except NotFound:
            # Its TTR ran out (this process stood still): beanstalkd gave it to another
            # consumer, whose claim decides. Nothing of ours to settle.
            log.info("job %s is no longer reserved by this consumer; leaving it to its new owner", job.id)
        finally:
            self.delivery.forget(job)
        self._log_settled(decision)

    def _log_settled(self, decision: Decision) -> None:
        """The one INFO line per settled mail: ids, vendor, outcome and time since reserve;
        never recipients or bodies (INFO goes to shared log stores)."""
        if not log.isEnabledFor(logging.INFO):
            return
        ms = round((self.monotonic() - self.started) * 1000, 1)
        vendor = decision.vendor or "-"
        fields = {
            "mail_id": str(self.oid),
            "job_id": self.job.id,
            "vendor": vendor,
            "outcome": decision.reason,
        }
        fields |= {"action": decision.action.value, "ms": ms}
        log.info(
            "mail %s job %s: %s via %s, %s, %.1f ms",
            self.oid,
            self.job.id,
            decision.reason or decision.action.value,
            vendor,
            decision.action.value,
            ms,
            extra=fields,
        )

    async def _reserved_before(self) -> bool:
        try:
            return int((await self.queue.stats_job(self.local_id)).get("reserves", 1)) > 1
        except BeanstalkError:
            return True  # unsure: keeping a job is harmless, dropping one is not

    async def hand_back(self) -> None:
        """Give the job back unfinished (shutdown): its claim is released (a send cut off while
        the vendor had it is recorded ``unknown``) and the job released at the mail's priority."""
        priority = await self.delivery.hand_back(self.job)
        await self.queue.release(self.local_id, priority=priority)

    def drop(self) -> None:
        """Leave the job to beanstalkd (its connection is being closed, which makes it ready
        again); its claim, if any, runs out with its lease or is taken back by this consumer."""
        self.delivery.forget(self.job)

    async def touch(self) -> None:
        await self.queue.touch(self.local_id)


async def run_job(owned: OwnedJob) -> Decision:
    """Claim, deliver, finish: what a reserve loop does with one job (without the overlap of
    the next claim, see :class:`mailer.consumer.Prefetch`)."""
    prepared = await owned.prepare()
    decision = await owned.delivery.deliver(prepared) if isinstance(prepared, Ready) else prepared
    await owned.finish(decision)
    return decision
