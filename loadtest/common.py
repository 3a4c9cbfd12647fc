"""Pieces the load test and the benchmark share: the production guard, the sample mail,
the environment of child processes, and the tube/collection housekeeping of a run."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import uuid
from typing import Any

from mailer.beanstalk import DEFAULT_PRIORITY, Beanstalk, Job
from mailer.config import Settings, load_settings
from mailer.errors import BeanstalkServerError, ConfigError, NotFound
from mailer.store import MailStore

# Simulated vendor failures are random per send, not an outage: with the default 10-minute
# cooldown a handful of them would open every breaker and park the rest of the run in
# back-off. Our own consumers therefore get a zero cooldown and short back-offs.
CONSUMER_TUNING = {
    "MAILER_CONSUMER__VENDOR_COOLDOWN_S": "0",
    "MAILER_CONSUMER__BACKOFF_BASE_S": "1",
    "MAILER_CONSUMER__BACKOFF_CAP_S": "5",
    "MAILER_CONSUMER__GRACE_S": "5",
}


def settings_or_exit(prog: str) -> Settings:
    """The [test] settings, or exit 2 when this is production (a load test there would send
    thousands of real mails and fill the real collections) or the configuration is unusable."""
    if os.environ.get("MAILER_ENV", "").strip().lower() == "production":
        _refuse(prog)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(2)
    if settings.production:
        _refuse(prog)
    return settings


def _refuse(prog: str) -> None:
    print(
        f"{prog}: refusing to run with MAILER_ENV=production: a load test sends thousands of mails "
        "through real vendors and into the real collections. Unset MAILER_ENV (or set it to "
        "'development') and run it against the local services.",
        file=sys.stderr,
    )
    sys.exit(2)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a case starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_suffix(kind: str) -> str:
    """A suffix for ``Settings.for_test``: valid in tube and collection names ([a-z_0-9])."""
    return f"_{kind}_{uuid.uuid4().hex[:8]}"


def sample_mail(run: str, n: int) -> dict[str, Any]:
    """A small, typical transactional mail; ``metadata.loadtest`` finds a run's mails again."""
    return {
        "from": "Load Test <loadtest@example.com>",
        "to": f"user{n}@example.com",
        "subject": f"Your order #{n} has shipped",
        "text": "Hello,\n\nyour order is on its way and should arrive within 3 days.\n\nThanks!",
        "metadata": {"loadtest": run, "n": n},
    }


def child_env(
    settings: Settings,
    *,
    latency_ms: float = 0.0,
    failure_rate: float = 0.0,
    measure_throughput: bool | None = None,
) -> dict[str, str]:
    """Environment for a producer or consumer child that points it at ``settings``' tube and
    collections. With ``--test`` the [test] section wins over the plain keys, so both are set.

    ``measure_throughput`` None keeps the user's setting (file or environment: the load test
    shows the lines); the benchmark passes False so that no meter runs in what it measures.
    """
    b, m = settings.beanstalkd, settings.mongodb
    env = {k: v for k, v in os.environ.items() if k != "MAILER_ENV"}
    if measure_throughput is not None:
        env["MAILER_MEASURE_THROUGHPUT"] = "true" if measure_throughput else "false"
    env.update(
        {
            "MAILER_TEST__TUBE": b.tube,
            "MAILER_TEST__COLLECTION": m.collection,
            "MAILER_TEST__VENDOR_STATUS_COLLECTION": m.vendor_status_collection,
            "MAILER_BEANSTALKD__TUBE": b.tube,
            "MAILER_MONGODB__COLLECTION": m.collection,
            "MAILER_MONGODB__VENDOR_STATUS_COLLECTION": m.vendor_status_collection,
            # The development outbox (the MIME copy of each simulated send, about 1.2 ms of
            # CPU a mail) is not part of delivering: production vendors never build it.
            "MAILER_SIMULATION__KEEP_RAW": "false",
            "MAILER_SIMULATION__LATENCY_MS": str(latency_ms),
            "MAILER_SIMULATION__FAILURE_RATE": str(failure_rate),
            **CONSUMER_TUNING,
        }
    )
    return env


async def tube_stats(bs: Beanstalk, tube: str) -> dict[str, int]:
    """The integer counters of ``stats-tube``; all zero while the tube does not exist yet."""
    try:
        raw = await bs.stats_tube(tube)
    except NotFound:
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, int)}


async def drain_tube(settings: Settings) -> int:
    """Delete every job left on the run's own tube (ready, delayed, buried); returns how many.

    Ready jobs go in pipelined rounds of reserve-with-timeout 0 and delete (10,000 of them
    take well under a second); the rest, rare, one by one through peeks.
    """
    b = settings.beanstalkd
    deleted = 0
    async with Beanstalk(b.host, b.port) as bs:
        await bs.use(b.tube)
        await bs.watch(b.tube)
        await bs.ignore("default")
        while True:
            got = await asyncio.gather(*(bs.reserve(0) for _ in range(500)), return_exceptions=True)
            jobs = [job for job in got if isinstance(job, Job)]
            await asyncio.gather(*(bs.delete(job.id) for job in jobs), return_exceptions=True)
            deleted += len(jobs)
            if len(jobs) < len(got):
                break
        for peek in (bs.peek_ready, bs.peek_delayed, bs.peek_buried):
            while (job := await peek()) is not None:
                try:
                    await bs.delete(job.id)
                except BeanstalkServerError:
                    break  # reserved by someone meanwhile: leave it
                deleted += 1
    return deleted


async def _release(bs: Beanstalk, job: Job) -> None:
    """Hand someone else's job back as it was (its own priority)."""
    pri = (await bs.stats_job(job.id)).get("pri")
    await bs.release(job.id, priority=pri if isinstance(pri, int) else DEFAULT_PRIORITY)


async def drop_collections(settings: Settings) -> None:
    """Drop the run's own collections (never the plain [test] ones: see ``delete_run``)."""
    async with MailStore(settings) as store:
        await store.mails.drop()
        await store.vendor_status.drop()


def run_query(run: str) -> dict[str, Any]:
    """The mails one run created (``sample_mail`` stamps the run id in their metadata)."""
    return {"mail.metadata.loadtest": {"$eq": run}}


async def run_mail_ids(settings: Settings, run: str) -> set[bytes]:
    """The run's mail ids as job bodies, to tell its jobs from others' on a shared tube."""
    async with MailStore(settings) as store:
        return {str(d["_id"]).encode() async for d in store.mails.find(run_query(run), {"_id": 1})}


async def delete_run(settings: Settings, run: str) -> int:
    """Delete one run's mails from a shared collection, and nothing else."""
    async with MailStore(settings) as store:
        result = await store.mails.delete_many(run_query(run))
        return result.deleted_count


async def drain_run_jobs(settings: Settings, bodies: set[bytes]) -> int:
    """Delete the jobs of ``bodies`` left on a shared tube (its consumers being stopped);
    others' jobs are released untouched. Returns how many were deleted.

    Others' ready jobs stay reserved until the end (released together), so each job is
    seen once; delayed and buried ones are only peeked at, so only the first of each
    state is looked at unless it is ours.
    """
    b = settings.beanstalkd
    deleted = 0
    async with Beanstalk(b.host, b.port) as bs:
        await bs.use(b.tube)
        await bs.watch(b.tube)
        await bs.ignore("default")
        held: list[Job] = []
        while True:
            got = await asyncio.gather(*(bs.reserve(0) for _ in range(500)), return_exceptions=True)
            jobs = [job for job in got if isinstance(job, Job)]
            ours = [job for job in jobs if job.body in bodies]
            held += [job for job in jobs if job.body not in bodies]
            await asyncio.gather(*(bs.delete(job.id) for job in ours), return_exceptions=True)
            deleted += len(ours)
            if len(jobs) < len(got):
                break
        await asyncio.gather(*(_release(bs, job) for job in held), return_exceptions=True)
        for peek in (bs.peek_delayed, bs.peek_buried):
            while (job := await peek()) is not None and job.body in bodies:
                try:
                    await bs.delete(job.id)
                except BeanstalkServerError:
                    break
                deleted += 1
    return deleted
