"""Starting, synchronising and stopping the producer and consumer child processes.

Every wait here has a deadline and every child is killed if it outlives its stop, so a
load test always ends, whatever a child does. Children's stderr goes to log files (shown
when something fails) because interleaved logs would wreck the live display.

A producer reports (``READY``, then its JSON result) on a pipe of its own, passed as
``--report-fd``, never on stdout: stdout belongs to whatever the child prints, such as the
``Producer PID:... Throughput: ...`` lines of ``measure_throughput`` (however it is set, in
the file or the environment), and a report read from stdout broke on the first of them.
Every child's stdout is read line by line and handed to ``on_output`` (the live display
prints it above the progress bars), so a chatty child can neither block on a full pipe nor
garble a report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from loadtest.common import tube_stats
from loadtest.producer import Mode, ProduceResult
from mailer.beanstalk import Beanstalk
from mailer.config import Settings

STOP_WAIT_S = 10.0
RELAY_WAIT_S = 2.0

OnOutput = Callable[[str, str], None]  # (child name, one line of its stdout)


class ChildError(RuntimeError):
    """A child process failed to start or misbehaved; the message names its log."""


@dataclass(slots=True)
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    log: IO[bytes]
    relay: asyncio.Task[None] | None = None  # copies stdout lines to on_output
    report: asyncio.StreamReader | None = None  # the --report-fd pipe, producers only
    report_transport: asyncio.BaseTransport | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        self.log.flush()
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


async def _spawn(
    name: str, args: list[str], env: dict[str, str], log_dir: Path, on_output: OnOutput, *, report: bool
) -> Child:
    log_path = log_dir / f"{name}.log"
    log = log_path.open("wb")
    pass_fds: tuple[int, ...] = ()
    read_fd = -1
    if report:
        read_fd, write_fd = os.pipe()
        pass_fds = (write_fd,)
        args = [*args, "--report-fd", str(write_fd)]
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            env=env,
            stdin=asyncio.subprocess.PIPE if report else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            pass_fds=pass_fds,
        )
    except BaseException:
        if report:
            os.close(read_fd)
        log.close()
        raise
    finally:
        for fd in pass_fds:
            os.close(fd)  # the child holds its own copy: EOF comes when the child exits
    child = Child(name, proc, log_path, log)
    assert proc.stdout is not None
    child.relay = asyncio.create_task(_relay(name, proc.stdout, on_output))
    if report:
        child.report, child.report_transport = await _reader(read_fd)
    return child


async def _reader(fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader, transport


async def _relay(name: str, stream: asyncio.StreamReader, on_output: OnOutput) -> None:
    """Every stdout line to ``on_output`` until EOF; a broken callback never stops the reading."""
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        if text:
            with contextlib.suppress(Exception):
                on_output(name, text)


async def stop(children: list[Child], *, sig: int = signal.SIGTERM) -> None:
    """Signal every child, wait up to STOP_WAIT_S, then kill what is left."""
    for child in children:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)
    for child in children:
        try:
            await asyncio.wait_for(child.proc.wait(), STOP_WAIT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            await child.proc.wait()
        await _finish(child)


async def _finish(child: Child) -> None:
    """After the exit: the last stdout lines relayed, the pipes and the log closed."""
    if child.relay is not None:
        try:
            await asyncio.wait_for(child.relay, RELAY_WAIT_S)
        except (TimeoutError, asyncio.CancelledError):
            child.relay.cancel()  # a grandchild holds stdout open: stop reading it
    if child.report_transport is not None:
        child.report_transport.close()
    child.log.close()


# --- consumers -------------------------------------------------------------------------------


async def start_consumers(
    count: int,
    concurrency: int,
    env: dict[str, str],
    log_dir: Path,
    extra_args: Sequence[str] = (),
    on_output: OnOutput | None = None,
) -> list[Child]:
    args = ["-m", "mailer.consumer", "--test", "--concurrency", str(concurrency), "--log-level", "WARNING"]
    args += extra_args
    out = on_output or _ignore
    return [await _spawn(f"consumer-{i + 1}", args, env, log_dir, out, report=False) for i in range(count)]


def _ignore(name: str, line: str) -> None:
    """Output nobody asked to see (the benchmark's children)."""


async def wait_watching(
    settings: Settings, at_least: int, deadline_s: float, children: list[Child] | None = None
) -> int:
    """Wait until ``at_least`` connections watch the tube: each reserve loop of a consumer
    watches it once connected, so this is "every consumer is ready to take jobs"."""
    b = settings.beanstalkd
    deadline = time.monotonic() + deadline_s
    async with Beanstalk(b.host, b.port) as bs:
        while True:
            watching = (await tube_stats(bs, b.tube)).get("current-watching", 0)
            if watching >= at_least:
                return watching
            for child in children or []:
                if child.proc.returncode is not None:
                    raise ChildError(
                        f"{child.name} exited with status {child.proc.returncode} at start-up; "
                        f"its log ({child.log_path}):\n{child.tail()}"
                    )
            if time.monotonic() > deadline:
                raise ChildError(
                    f"only {watching} of {at_least} reserve loops watch tube {b.tube!r} "
                    f"after {deadline_s:.0f} s"
                )
            await asyncio.sleep(0.1)


# --- producers -------------------------------------------------------------------------------


@dataclass(slots=True)
class ProducerGroup:
    """Producer children that start sending together on ``go()``."""

    children: list[Child] = field(default_factory=list)
    results: dict[str, ProduceResult] = field(default_factory=dict)

    @classmethod
    async def start(
        cls,
        total: int,
        processes: int,
        mode: Mode,
        run: str,
        env: dict[str, str],
        log_dir: Path,
        on_output: OnOutput | None = None,
    ) -> ProducerGroup:
        group = cls()
        share, extra = divmod(total, processes)
        first = 0
        for i in range(processes):
            n = share + (1 if i < extra else 0)
            args = ["-m", "loadtest.producer", "--mails", str(n), "--first", str(first)]
            args += ["--mode", mode, "--run", run]
            name = f"producer-{i + 1}"
            group.children.append(await _spawn(name, args, env, log_dir, on_output or _ignore, report=True))
            first += n
        return group

    async def _line(self, child: Child, deadline_s: float) -> str:
        assert child.report is not None
        try:
            raw = await asyncio.wait_for(child.report.readline(), deadline_s)
        except TimeoutError:
            raise ChildError(f"{child.name} did not answer within {deadline_s:.0f} s") from None
        if not raw:
            raise ChildError(f"{child.name} exited early; its log ({child.log_path}):\n{child.tail()}")
        return raw.decode().strip()

    async def ready(self, deadline_s: float) -> None:
        for child in self.children:
            if (line := await self._line(child, deadline_s)) != "READY":
                raise ChildError(f"{child.name} said {line[:80]!r} instead of READY")

    def go(self) -> None:
        for child in self.children:
            assert child.proc.stdin is not None
            child.proc.stdin.write(b"GO\n")

    async def collect(self, deadline_s: float) -> None:
        """Read each producer's result line (they are waiting for stdin to close afterwards)."""
        end = time.monotonic() + deadline_s
        for child in self.children:
            if child.name not in self.results:
                line = await self._line(child, max(0.1, end - time.monotonic()))
                try:
                    self.results[child.name] = ProduceResult(**json.loads(line))
                except (ValueError, TypeError):
                    raise ChildError(f"{child.name} reported {line[:80]!r} instead of its result") from None

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.children)

    async def close(self) -> None:
        """Close stdin (a finished producer then exits by itself); signal the ones that do not."""
        for child in self.children:
            if child.proc.stdin is not None and not child.proc.stdin.is_closing():
                child.proc.stdin.close()
        for child in self.children:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 3.0)
        await stop(self.children)
