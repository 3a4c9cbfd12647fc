"""Sending a load: the ``produce`` loop, and a producer child process around it.

The child (``python -m loadtest.producer``) connects, reports ``READY``, waits for ``GO`` on
stdin so that every producer starts at the same moment and start-up is not timed, sends,
reports one JSON line with its result, then stays alive until stdin closes: the parent reads
the child's CPU and peak RSS from /proc in between, while the process still exists.
Reports go to ``--report-fd`` (a pipe of the parent's), never stdout, which stays free for
the throughput lines of ``measure_throughput`` and anything else a library prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TextIO

from loadtest.common import sample_mail
from mailer.config import load_settings
from mailer.errors import MailerError
from mailer.producer import Producer

Mode = Literal["send", "send_many"]
SEND_CONCURRENCY = 50  # concurrent send() tasks per producer, as in the benchmark
BATCH = 1000  # mails per send_many() call, as in the benchmark


@dataclass(slots=True)
class ProduceResult:
    sent: int
    errors: int
    start: float  # epoch seconds
    end: float
    first_error: str | None = None


async def produce(
    producer: Producer,
    mails: Sequence[dict[str, Any]],
    mode: Mode,
    *,
    concurrency: int = SEND_CONCURRENCY,
    batch: int = BATCH,
) -> ProduceResult:
    """Send ``mails`` with ``send`` from ``concurrency`` tasks, or with ``send_many`` in batches.

    Failures are counted, not raised: a load test reports how many mails did not make it.
    """
    result = ProduceResult(0, 0, time.time(), 0.0)

    def failed(exc: MailerError, n: int) -> None:
        result.errors += n
        if result.first_error is None:
            result.first_error = f"{type(exc).__name__}: {exc}"

    if mode == "send":
        pending = iter(mails)

        async def worker() -> None:
            for mail in pending:
                try:
                    await producer.send(mail)
                    result.sent += 1
                except MailerError as exc:
                    failed(exc, 1)

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    else:
        for i in range(0, len(mails), batch):
            chunk = mails[i : i + batch]
            try:
                await producer.send_many(chunk)
                result.sent += len(chunk)
            except MailerError as exc:
                failed(exc, len(chunk))
    result.end = time.time()
    return result


async def _stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _child(mails: int, first: int, mode: Mode, run: str, report: TextIO) -> int:
    settings = load_settings(test=True)  # the parent points [test] at the run's tube
    batch = [sample_mail(run, first + i) for i in range(mails)]
    async with Producer(settings) as producer:
        print("READY", file=report, flush=True)
        if (await _stdin_line()).strip() != "GO":
            return 1
        result = await produce(producer, batch, mode)
    print(json.dumps(asdict(result)), file=report, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.producer", description=__doc__)
    p.add_argument("--mails", type=int, required=True)
    p.add_argument("--first", type=int, default=0, help="number of the first mail (for unique subjects)")
    p.add_argument("--mode", choices=["send", "send_many"], default="send")
    p.add_argument("--run", required=True, help="run id stored in each mail's metadata")
    p.add_argument("--report-fd", type=int, default=None, help="where READY and the result go (stdout)")
    args = p.parse_args(argv)
    report = sys.stdout if args.report_fd is None else os.fdopen(args.report_fd, "w", buffering=1)
    return asyncio.run(_child(args.mails, args.first, args.mode, args.run, report))


if __name__ == "__main__":
    sys.exit(main())
