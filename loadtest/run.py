"""One load test: consumers up, producers go, progress until every mail is settled, summary.

The live display polls only beanstalkd's ``stats-tube`` (``total-jobs`` = queued,
``cmd-delete`` = delivered, as a consumer deletes a job only once its record is written):
a status count on nx-27017 costs about 0.3 s of its CPU per call at 10,000 mails and would
slow down the very server being measured. MongoDB is read once, at the end, for the truth.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest import children
from loadtest.children import Child, ChildError, ProducerGroup
from loadtest.common import child_env, delete_run, drain_tube, drop_collections, tube_stats
from loadtest.procstat import ProcWatch, server_pids
from loadtest.producer import Mode
from loadtest.summary import Delivered, Summary
from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.errors import MailerError
from mailer.store import MailStore

POLL_S = 0.5
START_S = 60.0  # bound on child start-up (imports, connects) within the run's timeout


@dataclass(frozen=True, slots=True)
class Options:
    """The command line's options (see ``python -m loadtest --help``)."""

    mails: int = 10000
    producers: int = 1
    mode: Mode = "send"
    consumers: int = 1
    concurrency: int = 50
    vendor_latency_ms: float = 0.0
    vendor_failure_rate: float = 0.0
    external_consumers: bool = False
    timeout: float = 300.0


class LoadTest:
    """One run. Its state lives here so that clean-up can stop whatever did get started."""

    def __init__(self, base: Settings, opts: Options, console: Console) -> None:
        self.opts = opts
        self.console = console
        self.run_id = uuid.uuid4().hex[:8]
        # External consumers only know the plain [test] tube; our own get a tube of their own.
        self.settings = base.for_test() if opts.external_consumers else base.for_test(f"_lt_{self.run_id}")
        self.env = child_env(
            self.settings, latency_ms=opts.vendor_latency_ms, failure_rate=opts.vendor_failure_rate
        )
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"loadtest-{self.run_id}-"))
        self.summary = Summary(requested=opts.mails, run_id=self.run_id)
        self.watch = ProcWatch()
        self.consumers: list[Child] = []
        self.producers = ProducerGroup()
        self.t_go = 0.0

    async def run(self) -> Summary:
        for name, pid in server_pids().items():
            self.watch.add(name, pid, "server", own=False)
        self.watch.add("loadtest", os.getpid(), "loadtest")
        started = time.monotonic()
        try:
            try:
                async with asyncio.timeout(self.opts.timeout):
                    await self._drive()
            except TimeoutError:
                self.summary.timed_out = True
                self.summary.problem = f"timed out after {self.opts.timeout:.0f} s (--timeout)"
            except (ChildError, MailerError) as exc:
                self.summary.problem = str(exc)
            finally:
                self.watch.stop()
                await self.producers.close()
                await children.stop(self.consumers)
            self.summary.wall_s = time.monotonic() - started
            self._tally_producers()
            self.summary.procs = list(self.watch.procs.values())
            if self.t_go:
                await self._read_results()
        finally:
            await self._clean_up()  # also on Ctrl-C: the children are stopped by then
        return self.summary

    async def _drive(self) -> None:
        o, s = self.opts, self.settings
        if o.external_consumers:
            try:
                await children.wait_watching(s, 1, 3.0)
            except ChildError:
                raise ChildError(
                    f"--external-consumers: no consumer watches tube {s.beanstalkd.tube!r}; "
                    "start one with 'mailer-consumer --test'"
                ) from None
        else:
            self.consumers = await children.start_consumers(
                o.consumers, o.concurrency, self.env, self.log_dir
            )
            for c in self.consumers:
                self.watch.add(c.name, c.pid, "consumer")
            await children.wait_watching(s, o.consumers * o.concurrency, START_S, self.consumers)
        self.producers = await ProducerGroup.start(
            o.mails, o.producers, o.mode, self.run_id, self.env, self.log_dir
        )
        for c in self.producers.children:
            self.watch.add(c.name, c.pid, "producer")
        await self.producers.ready(START_S)
        await self._send_and_follow()

    async def _send_and_follow(self) -> None:
        b, o = self.settings.beanstalkd, self.opts
        async with Beanstalk(b.host, b.port) as bs:
            base = await tube_stats(bs, b.tube)
            self.watch.start()
            self.t_go = time.time()
            self.producers.go()
            collecting = asyncio.create_task(self.producers.collect(o.timeout))
            try:
                await self._follow(bs, base, collecting)
            finally:
                collecting.cancel()
        self.watch.stop()

    async def _follow(self, bs: Beanstalk, base: dict[str, int], collecting: asyncio.Task[None]) -> None:
        """Show progress until every mail the producers sent is settled (deleted or buried)."""
        tube, o = self.settings.beanstalkd.tube, self.opts
        with self._progress() as progress:
            queued = progress.add_task("queued", total=o.mails)
            delivered = progress.add_task("delivered", total=o.mails)
            while True:
                now = await tube_stats(bs, tube)
                put = now.get("total-jobs", 0) - base.get("total-jobs", 0)
                settled = now.get("cmd-delete", 0) - base.get("cmd-delete", 0)
                settled += max(0, now.get("current-jobs-buried", 0) - base.get("current-jobs-buried", 0))
                progress.update(queued, completed=put)
                progress.update(delivered, completed=min(settled, o.mails))
                self.watch.sample()
                self.summary.queued = put
                if collecting.done():
                    collecting.result()  # a producer's failure ends the run here
                    if settled >= sum(r.sent for r in self.producers.results.values()):
                        break
                self._check_consumers()
                await asyncio.sleep(POLL_S)

    def _tally_producers(self) -> None:
        results = list(self.producers.results.values())
        if not results:
            return
        s = self.summary
        s.produced = sum(r.sent for r in results)
        s.produce_errors = sum(r.errors for r in results)
        s.first_error = next((r.first_error for r in results if r.first_error), None)
        span = max(r.end for r in results) - min(r.start for r in results)
        s.producer_rate = s.produced / span if span > 0 else 0.0

    def _check_consumers(self) -> None:
        dead = [c for c in self.consumers if c.proc.returncode is not None]
        if dead:
            c = dead[0]
            raise ChildError(f"{c.name} exited with status {c.proc.returncode}; its log:\n{c.tail()}")

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description:>9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TimeElapsedColumn(),
            console=self.console,
            refresh_per_second=4,
        )

    async def _read_results(self) -> None:
        query = {"mail.metadata.loadtest": {"$eq": self.run_id}} if self.opts.external_consumers else {}
        fields = {"_id": 0, "status": 1, "created_at": 1, "sent_at": 1}
        try:
            async with asyncio.timeout(60), MailStore(self.settings) as store:
                docs = [d async for d in store.mails.find(query, fields)]
        except Exception as exc:
            self.summary.problem = f"could not read the results from MongoDB: {type(exc).__name__}: {exc}"
            return
        d = self.summary.delivered = Delivered.from_docs(docs)
        if d.sent and d.last_sent > self.t_go:
            self.summary.e2e_rate = d.sent / (d.last_sent - self.t_go)

    async def _clean_up(self) -> None:
        """Our own tube and collections go; on the shared [test] ones only this run's mails,
        and only once delivered (undelivered ones are left for the external consumers)."""
        try:
            async with asyncio.timeout(60):
                if not self.opts.external_consumers:
                    await drain_tube(self.settings)
                    await drop_collections(self.settings)
                elif self.summary.ok:
                    await delete_run(self.settings, self.run_id)
        except Exception as exc:
            self.console.print(f"[yellow]clean-up incomplete: {type(exc).__name__}: {exc}[/]")
        if self.summary.ok:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        else:
            self.console.print(f"child logs kept in {self.log_dir}")


async def run_loadtest(base: Settings, opts: Options, console: Console) -> Summary:
    return await LoadTest(base, opts, console).run()
