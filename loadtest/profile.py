"""``python -m loadtest.profile send|lone|send_many|drain``: where the client CPU goes.

``lone`` is ``send`` from one task, each call awaited before the next (issue 16).

py-spy (``pip install py-spy`` into the venv; not a declared dependency) is attached only
for the timed window of one benchmark case (to this process for the producer cases, to
the consumer child for the drain), so start-up and clean-up do not blur the picture. The
collapsed stacks are kept (flamegraph.pl-compatible) and summarised by component: the
leaf-most frame that matches a component's pattern decides where a sample goes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from loadtest import cases
from loadtest.common import sample_mail, settings_or_exit
from loadtest.producer import SEND_CONCURRENCY, Mode, produce
from mailer.cmdline import add_loop
from mailer.config import Settings
from mailer.producer import Producer

PROG = "python -m loadtest.profile"
OUT = Path(tempfile.gettempdir()) / "mailer-profile"
COMPONENTS = (
    ("socket writes (syscalls)", r"_SelectorSocketTransport\.write|sock_sendall|socket\.send"),
    ("socket reads (syscalls)", r"_read_ready__get_buffer|_read_ready__data_received|recv_into"),
    ("mail validation (pydantic, email_validator)", r"email_validator|model_validate|mailer/models\.py"),
    ("MailStore.new_document", r"new_document"),
    ("BSON encode/decode", r"bson/|_op_msg|message\.py|decode_all|unpack_response"),
    ("pymongo per-operation machinery", r"pymongo/"),
    ("mailer.beanstalk client", r"mailer/beanstalk\.py"),
    ("mailer delivery/store/routing/consumer", r"mailer/(delivery|store|routing|consumer|vendors|producer)"),
    ("asyncio event loop, tasks, timers", r"asyncio/|selectors\.py"),
)

# Inclusive shares (a sample counts for every step on its stack): what each step of the
# send path costs in all, pymongo and BSON below it included.
STEPS = (
    ("validation (Producer.validate)", r"\bvalidate \(mailer/producer\.py"),
    ("document building (new_document, _entry)", r"new_document|_entry \(mailer/producer"),
    ("insert (MailStore.insert*)", r"\binsert(_many|_one_mail)? \(mailer/store\.py"),
    ("puts (Producer._put*)", r"_put(_many|_one)? \(mailer/producer\.py"),
    ("receipts (record_jobs, record_job_ids)", r"record_jobs|record_job_ids"),
    ("group commit (mailer/batching.py)", r"mailer/batching\.py"),
    ("throughput meter", r"mailer/throughput\.py"),
)


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(found, os.X_OK):
        print(f"{PROG}: py-spy not found; install it with '.venv/bin/pip install py-spy'", file=sys.stderr)
        sys.exit(2)
    return found


class Spy:
    """py-spy attached to one process between ``started`` and ``finished``."""

    def __init__(self, out: Path, rate: int) -> None:
        self.out, self.rate = out, rate
        self.proc: asyncio.subprocess.Process | None = None

    async def started(self, pids: list[int]) -> None:
        args = ["record", "--nonblocking", "-r", str(self.rate), "-f", "raw", "-o", str(self.out)]
        self.proc = await asyncio.create_subprocess_exec(
            py_spy(), *args, "--pid", str(pids[0]), stdout=asyncio.subprocess.DEVNULL
        )
        await asyncio.sleep(0.5)  # let it attach before the window opens

    async def finished(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            await asyncio.wait_for(self.proc.wait(), 30)


def breakdown(raw: Path) -> list[tuple[str, float]]:
    """Share of on-CPU samples per component (idle executor threads left out)."""
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "concurrent/futures/thread.py:81" in stack:
            continue
        frames = stack.split(";")[1:]
        name = next(
            (n for f in reversed(frames) for n, pattern in COMPONENTS if re.search(pattern, f)),
            "other",
        )
        totals[name] += int(count)
    n = sum(totals.values()) or 1
    return [(name, c / n * 100) for name, c in totals.most_common()]


def steps(raw: Path) -> list[tuple[str, float]]:
    """Inclusive share of on-CPU samples per step of the send path (see ``STEPS``)."""
    totals: collections.Counter[str] = collections.Counter()
    n = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "concurrent/futures/thread.py:81" in stack:
            continue
        n += int(count)
        for name, pattern in STEPS:
            if re.search(pattern, stack):
                totals[name] += int(count)
    return [(name, totals[name] / max(1, n) * 100) for name, _ in STEPS]


async def profile(base: Settings, case: str, mails: int, spy: Spy, consumer_args: Sequence[str]) -> str:
    if case == "drain":
        d = await cases.drain_case(
            base,
            mails=mails,
            processes=1,
            concurrency=50,
            latency_ms=0.0,
            stall_probe=False,
            observer=spy,
            consumer_args=consumer_args,
        )
        return f"drain {d.rate:,.0f} mails/s, consumer {d.consumer_cpu_us:,.0f} us CPU/mail"
    mode: Mode = "send_many" if case == "send_many" else "send"
    tasks = 1 if case == "lone" else SEND_CONCURRENCY
    batch = [sample_mail("profile", i) for i in range(mails)]
    async with cases.scratch(base, "pp") as settings, Producer(settings) as producer:
        await produce(producer, batch[:200], mode, concurrency=tasks)  # warm-up: connections, caches
        await spy.started([os.getpid()])
        result = await produce(producer, batch[200:], mode, concurrency=tasks)
        await spy.finished()
    rate = result.sent / (result.end - result.start)
    return f"{case} {rate:,.0f} mails/s (under py-spy)"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("case", choices=["send", "lone", "send_many", "drain"])
    p.add_argument(
        "--mails", type=int, default=None, help="default 5000 (send, lone), 20000 (send_many), 10000"
    )
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second (250)")
    p.add_argument("--out", type=Path, default=OUT, help=f"where <case>.raw goes ({OUT})")
    add_loop(p)  # drain: passed on to the consumer
    a = p.parse_args(argv)
    base = settings_or_exit(PROG).for_test()
    py_spy()
    mails = a.mails or {"send": 5000, "lone": 5000, "send_many": 20000}.get(a.case, 10000)
    a.out.mkdir(parents=True, exist_ok=True)
    raw = a.out / f"{a.case}.raw"
    spy = Spy(raw, a.rate)
    line = asyncio.run(profile(base, a.case, mails, spy, ["--loop", a.loop]))
    print(line)
    for name, share in breakdown(raw):
        print(f"{share:5.1f}%  {name}")
    print("inclusive, by step of the send path:")
    for name, share in steps(raw):
        print(f"{share:5.1f}%  {name}")
    print(f"collapsed stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
