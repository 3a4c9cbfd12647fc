"""``python -m loadtest`` (``make loadtest ARGS=...``): mails through producer -> consumer.

Exit status: 0 when every mail was delivered, 1 when not (or on a timeout), 2 for bad
arguments or ``MAILER_ENV=production``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from rich.console import Console

from loadtest.common import settings_or_exit
from loadtest.run import Options, run_loadtest
from loadtest.summary import Summary
from mailer.config import Settings

PROG = "python -m loadtest"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Send mails through producer -> beanstalkd -> consumer on the local services, "
        "with live progress and a summary (throughput, latency, CPU and memory per process). "
        "Producers send with 50 concurrent send() calls each, or send_many() in batches of 1,000.",
    )
    p.add_argument("--mails", type=int, default=10000, help="mails to send (default 10000)")
    p.add_argument("--producers", type=int, default=1, help="producer processes (default 1)")
    p.add_argument("--mode", choices=["send", "send_many"], default="send", help="producer call (send)")
    p.add_argument(
        "--consumers",
        type=int,
        default=None,
        help="start this many consumer processes of its own (default: use the consumers already "
        "watching the [test] tube, as 'mailer-consumer --test' starts them, else start 1)",
    )
    p.add_argument("--concurrency", type=int, default=50, help="reserve loops per consumer (default 50)")
    p.add_argument("--vendor-latency-ms", type=float, default=0.0, help="simulated vendor latency")
    p.add_argument("--vendor-failure-rate", type=float, default=0.0, help="simulated failure rate, 0..1")
    p.add_argument(
        "--external-consumers",
        action="store_true",
        help="only use consumers already running with --test (an error when none watch the [test] tube)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (300)")
    return p


def _options(argv: Sequence[str] | None) -> Options:
    p = _parser()
    a = p.parse_args(argv)
    if a.consumers is not None and a.external_consumers:
        p.error("--consumers starts its own consumers; --external-consumers uses running ones: pick one")
    if a.mails < 1 or a.producers < 1 or (a.consumers is not None and a.consumers < 1) or a.concurrency < 1:
        p.error("--mails, --producers, --consumers and --concurrency must be at least 1")
    if a.producers > a.mails:
        p.error("--producers cannot exceed --mails")
    if not 0 <= a.vendor_failure_rate <= 1 or a.vendor_latency_ms < 0:
        p.error("--vendor-failure-rate must be within 0..1 and --vendor-latency-ms not negative")
    if a.timeout <= 0:
        p.error("--timeout must be positive")
    return Options(
        mails=a.mails,
        producers=a.producers,
        mode=a.mode,
        consumers=a.consumers,
        concurrency=a.concurrency,
        vendor_latency_ms=a.vendor_latency_ms,
        vendor_failure_rate=a.vendor_failure_rate,
        external_consumers=a.external_consumers,
        timeout=a.timeout,
    )


async def _run(settings: Settings, opts: Options, console: Console) -> Summary:
    """The run, cancelled (and so cleaned up like a Ctrl-C) by SIGTERM too."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_loadtest(settings, opts, console)


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_or_exit(PROG)
    opts = _options(argv)
    console = Console()
    try:
        summary = asyncio.run(_run(settings, opts, console))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("interrupted: children stopped, the run's mails (and any private tube) removed")
        return 130
    summary.render(console)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
