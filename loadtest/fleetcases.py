"""Drain with 2 beanstalkd servers against 1, 2 consumer processes each, in the same run.

Both runs use the local beanstalkd and nx-27017; the two-server run adds a private beanstalkd
(its binlog in a temporary directory) and lists both in ``beanstalkd.servers``. The jobs are
put at once (pipelined, each on its mail's server) once every reserve loop watches the tube,
and the drain is timed until the last job is deleted; each process's CPU over that window
comes from /proc.

``python -m loadtest.fleetcases --mails 4000`` runs both and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import children
from loadtest.cases import scratch
from loadtest.common import child_env, settings_or_exit
from loadtest.procstat import ProcWatch, server_pids
from loadtest.raw import mail_docs
from mailer.config import Settings
from mailer.errors import NotFound
from mailer.fleet import Fleet
from mailer.store import MailStore

PROG = "python -m loadtest.fleetcases"
POLL_S = 0.02


@dataclass(slots=True)
class FleetDrain:
    servers: int
    mails: int
    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process, over the drain

    @property
    def rate(self) -> float:
        return self.mails / self.seconds if self.seconds > 0 else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def extra_beanstalkd() -> AsyncIterator[tuple[int, int]]:
    """A private beanstalkd with a binlog of its own: (port, pid); killed on the way out."""
    exe = shutil.which("beanstalkd")
    if exe is None:
        raise SystemExit(f"{PROG}: beanstalkd is not installed ('make services' installs it)")
    binlog = Path(tempfile.mkdtemp(prefix="fleet-binlog-"))
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(exe, "-l", "127.0.0.1", "-p", str(port), "-b", str(binlog))
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline or proc.returncode is not None:
                raise RuntimeError(f"the extra beanstalkd on port {port} did not start")
            await asyncio.sleep(0.02)
        yield port, proc.pid
    finally:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 5)
        shutil.rmtree(binlog, ignore_errors=True)


async def _stat(fleet: Fleet, tube: str, key: str) -> int:
    try:
        return int((await fleet.stats_tube(tube)).get(key, 0))
    except NotFound:
        return 0


async def _until(fleet: Fleet, tube: str, key: str, target: int, within: float) -> float:
    deadline = time.monotonic() + within
    while await _stat(fleet, tube, key) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"tube {tube}: {key} below {target} after {within:.0f} s")
        await asyncio.sleep(POLL_S)
    return time.monotonic()


async def fleet_drain(
    base: Settings, *, mails: int, servers: Sequence[str], extra_pids: dict[str, int], concurrency: int
) -> FleetDrain:
    """2 consumer processes drain ``mails`` jobs spread over ``servers``."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    async with scratch(base, "bf") as scratch_settings:
        b = scratch_settings.beanstalkd.model_copy(update={"servers": tuple(servers)})
        settings = scratch_settings.model_copy(update={"beanstalkd": b})
        async with MailStore(settings) as store, Fleet.from_settings(settings.beanstalkd) as fleet:
            docs = mail_docs(mails, "fleet")
            for i in range(0, mails, 1000):
                await store.mails.insert_many(docs[i : i + 1000])
            env = child_env(settings, measure_throughput=False)
            env["MAILER_BEANSTALKD__SERVERS"] = json.dumps(list(servers))
            consumers = await children.start_consumers(2, concurrency, env, log_dir)
            watch = ProcWatch()
            for name, pid in {**server_pids(), **extra_pids}.items():
                watch.add(name, pid, "server", own=False)
            for c in consumers:
                watch.add(c.name, c.pid, "consumer")
            try:
                await fleet.use(b.tube)
                await _until(fleet, b.tube, "current-watching", 2 * max(concurrency, len(servers)), 60)
                watch.start()
                t0 = time.monotonic()
                ids = [str(d["_id"]) for d in docs]
                for i in range(0, mails, 1000):
                    await fleet.put_many(ids[i : i + 1000], ttr=b.ttr_s)
                t1 = await _until(fleet, b.tube, "cmd-delete", mails, 30 + mails / 50)
                watch.stop()
            finally:
                await children.stop(consumers)
    shutil.rmtree(log_dir, ignore_errors=True)
    return FleetDrain(len(servers), mails, t1 - t0, {u.name: u.cpu_s for u in watch.procs.values()})


async def run(base: Settings, mails: int, concurrency: int) -> list[FleetDrain]:
    b = base.beanstalkd
    first = f"{b.host}:{b.port}"
    one = await fleet_drain(base, mails=mails, servers=[first], extra_pids={}, concurrency=concurrency)
    async with extra_beanstalkd() as (port, pid):
        two = await fleet_drain(
            base,
            mails=mails,
            servers=[first, f"127.0.0.1:{port}"],
            extra_pids={"beanstalkd-2": pid},
            concurrency=concurrency,
        )
    return [one, two]


def render(results: Sequence[FleetDrain]) -> str:
    names = sorted({n for r in results for n in r.cpu_s})
    head = "| servers | mails/s | " + " | ".join(f"{n} CPU s" for n in names) + " |"
    rows = [head, "|" + "---|" * (2 + len(names))]
    for r in results:
        cells = [f"{r.cpu_s[n]:.2f}" if n in r.cpu_s else "-" for n in names]
        rows.append(f"| {r.servers} | {r.rate:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--mails", type=int, default=4000, help="mails per drain (default 4000)")
    p.add_argument("--concurrency", type=int, default=50, help="reserve loops per consumer (default 50)")
    args = p.parse_args(argv)
    base = settings_or_exit(PROG)
    results = asyncio.run(run(base, args.mails, args.concurrency))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
