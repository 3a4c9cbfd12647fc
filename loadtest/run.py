"""One load test: consumers up, producers go, progress until every mail is settled, summary.

It works on the [test] tube and collections, as ``mailer-consumer --test`` does: consumers
already watching that tube are used (and named), otherwise it starts its own; with
``--consumers N`` it always starts its own, on a private tube when others watch the [test]
one (so that they take none of the jobs being measured). Its mails carry the run id in
their metadata, and it removes those and nothing else from a shared collection.

The live display polls only beanstalkd's ``stats-tube`` (``total-jobs`` = queued,
``cmd-delete`` = delivered, as a consumer deletes a job only once its record is written):
a status count on nx-27017 costs about 0.3 s of its CPU per call at 10,000 mails and would
slow down the very server being measured. MongoDB is read once, at the end, for the truth.
"""

from __future__ import annotations

import asyncio
import os
import re
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
from loadtest.common import (
    child_env,
    delete_run,
    drain_run_jobs,
    drain_tube,
    drop_collections,
    run_mail_ids,
    run_query,
    tube_stats,
)
from loadtest.procstat import ProcWatch, consumers_of_test_tube, server_pids
from loadtest.producer import Mode
from loadtest.summary import Delivered, Summary
from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.errors import MailerError
from mailer.store import MailStore

POLL_S = 0.5
START_S = 60.0  # bound on child start-up (imports, connects) within the run's timeout
THROUGHPUT = re.compile(r"Throughput: ([0-9.]+) ops / second")


@dataclass(frozen=True, slots=True)
class Options:
    """The command line's options (see ``python -m loadtest --help``)."""

    mails: int = 10000
    producers: int = 1
    mode: Mode = "send"
    consumers: int | None = None  # None: the running consumers of the [test] tube, else 1 of ours
    concurrency: int = 50
    vendor_latency_ms: float = 0.0
    vendor_failure_rate: float = 0.0
    external_consumers: bool = False  # running consumers or nothing (an error when none)
    timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class Running:
    """The consumers already watching a tube: beanstalkd's count of watching connections
    (one per reserve loop) and the local processes behind them (see procstat)."""

    tube: str
    loops: int
    pids: tuple[int, ...]

    def describe(self) -> str:
        if not self.pids:
            return (
                f"using the running consumers on tube {self.tube}: {self.loops} reserve loops watch it, "
                "none of them a process on this machine, so they are not counted or measured"
            )
        n = len(self.pids)
        pids = ", ".join(map(str, self.pids))
        return (
            f"using {n} running consumer{'s' if n != 1 else ''} on tube {self.tube} "
            f"(PID {pids}; {self.loops} reserve loops)"
        )


async def running_consumers(settings: Settings) -> Running:
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as bs:
        loops = (await tube_stats(bs, b.tube)).get("current-watching", 0)
    pids = tuple(consumers_of_test_tube(b.host, b.port, b.tube)) if loops else ()
    return Running(b.tube, loops, pids)


class LoadTest:
    """One run. Its state lives here so that clean-up can stop whatever did get started."""

    def __init__(self, base: Settings, opts: Options, console: Console) -> None:
        self.opts = opts
        self.console = console
        self.run_id = uuid.uuid4().hex[:8]
        self.base = base
        self.settings = base.for_test()  # until _plan: the [test] tube, or a private one
        self.private = False  # our own tube and collections (dropped at the end)
        self.running: Running | None = None  # the consumers we use, when not our own
        self.env: dict[str, str] = {}
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

    def _say(self, line: str) -> None:
        self.summary.notes.append(line)
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _on_output(self, child: str, line: str) -> None:
        """A child's stdout line (throughput lines, mostly): above the progress bars."""
        if m := THROUGHPUT.search(line):
            self.summary.throughput.setdefault(child, []).append(float(m.group(1)))
        self.console.print(f"{child}: {line}", markup=False, highlight=False, soft_wrap=True)

    async def _plan(self) -> int:
        """Whose consumers, on which tube; returns how many of our own to start."""
        o = self.opts
        running = await running_consumers(self.base.for_test())
        if o.consumers is None and running.loops:
            self.running = running
            self._say(running.describe())
            if o.vendor_latency_ms or o.vendor_failure_rate:
                self._say("(--vendor-latency-ms/--vendor-failure-rate only apply to consumers it starts)")
            return 0
        if o.external_consumers:
            raise ChildError(
                f"--external-consumers: no consumer watches tube {running.tube}; "
                "start some with 'mailer-consumer --test' (or drop the option to start its own)"
            )
        n = o.consumers or 1
        what = f"{n} consumer{'s' if n != 1 else ''}"
        if not running.loops:
            why = "" if o.consumers else f"no consumer watches tube {running.tube}: "
            self._say(f"{why}starting {what} on tube {running.tube}")
        else:
            self.private, self.settings = True, self.base.for_test(f"_lt_{self.run_id}")
            self._say(
                f"starting {what} on a private tube {self.settings.beanstalkd.tube} (--consumers): "
                f"the {running.loops} reserve loops watching {running.tube} take none of its jobs"
            )
        return n

    async def _drive(self) -> None:
        o = self.opts
        own = await self._plan()
        s = self.settings
        self.env = child_env(s, latency_ms=o.vendor_latency_ms, failure_rate=o.vendor_failure_rate)
        if self.running is not None:
            for pid in self.running.pids:
                self.watch.add(f"running-consumer-{pid}", pid, "consumer", own=False)
        else:
            self.consumers = await children.start_consumers(
                own, o.concurrency, self.env, self.log_dir, on_output=self._on_output
            )
            for c in self.consumers:
                self.watch.add(c.name, c.pid, "consumer")
            await children.wait_watching(s, own * o.concurrency, START_S, self.consumers)
        self.producers = await ProducerGroup.start(
            o.mails, o.producers, o.mode, self.run_id, self.env, self.log_dir, self._on_output
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
        query = run_query(self.run_id)
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
        """A private tube and collections go whole; on the shared [test] ones only this run's
        mails (and, our consumers being stopped, its jobs), and while running consumers keep
        working only once every mail is settled (undelivered ones are left to them)."""
        try:
            async with asyncio.timeout(60):
                if self.private:
                    await drain_tube(self.settings)
                    await drop_collections(self.settings)
                elif self.running is None:
                    if not self.summary.ok:
                        await drain_run_jobs(self.settings, await run_mail_ids(self.settings, self.run_id))
                    await delete_run(self.settings, self.run_id)
                elif self.summary.ok:
                    await delete_run(self.settings, self.run_id)
                else:
                    self.console.print(
                        f"this run's undelivered mails stay in {self.settings.mongodb.collection} for the "
                        f"running consumers (metadata.loadtest = {self.run_id!r})"
                    )
        except Exception as exc:
            self.console.print(f"[yellow]clean-up incomplete: {type(exc).__name__}: {exc}[/]")
        if self.summary.ok:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        else:
            self.console.print(f"child logs kept in {self.log_dir}")


async def run_loadtest(base: Settings, opts: Options, console: Console) -> Summary:
    return await LoadTest(base, opts, console).run()
