"""``python -m loadtest.bench`` (``make bench``): the fixed benchmark matrix.

Each run measures every case once, raw baselines first and the cases set beside them right
after (the producer's, the API's, then the drains), so a ratio compares figures taken a
minute or two apart on the same servers rather than ten; the table shows medians over the
runs. Results go to ``bench/results.json`` (with the machine and every run's raw values)
and ``bench/results.md`` (the table, also printed).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from loadtest import apicases, cases, consolecases, fleetcases, lonecases, ratecases, raw
from loadtest.common import settings_or_exit
from loadtest.producer import Mode
from loadtest.report import Samples, summarise, write
from mailer.config import Settings
from mailer.store import MailStore

PROG = "python -m loadtest.bench"
OUT_DIR = Path(__file__).resolve().parents[1] / "bench"  # the project's bench/, from anywhere


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each case does: the full matrix, or ``--quick``'s smoke-sized one."""

    puts: int = 20000
    insert_one: int = 5000
    insert_many: int = 10000
    send: int = 5000
    send_many: int = 10000
    drain: int = 10000
    console: int = 100_000  # mails stored for the console's page times (issue 11)


QUICK = Sizes(
    puts=5000, insert_one=1000, insert_many=2000, send=1000, send_many=2000, drain=1000, console=5000
)


async def one_run(
    base: Settings, sizes: Sizes, console: Console
) -> tuple[dict[str, float], dict[str, object]]:
    """Every case once; returns the row values and the details kept in the JSON."""
    values: dict[str, float] = {}
    extra: dict[str, object] = {}

    def note(key: str, text: str) -> None:
        console.print(f"  {key:<16} {text}", soft_wrap=True)

    b = base.beanstalkd
    async with cases.scratch(base, "br") as settings:
        m = await raw.beanstalkd_puts(b.host, b.port, settings.beanstalkd.tube, sizes.puts)
        values["raw_put"] = m.rate
        extra["raw_put"] = asdict(m)
        note("raw_put", f"{m.rate:,.0f} jobs/s; server CPU us/op: {m.server_us()}")
        async with MailStore(settings) as store:
            for key, m in (await raw.mongo_baselines(store, sizes.insert_one, sizes.insert_many)).items():
                values[key], values[f"{key}_cpu"] = m.rate, m.cpu_us
                extra[key] = asdict(m)
                note(key, f"{m.rate:,.0f}/s; CPU us/op: client {m.cpu_us:,.0f}, {m.server_us()}")
    producers: tuple[tuple[str, Mode, int], ...] = (
        ("send", "send", sizes.send),
        ("send_many", "send_many", sizes.send_many),
    )
    for key, mode, n in producers:
        m = await cases.producer_case(base, mode, n)
        values[key], values[f"cpu_{key}"] = m.rate, m.cpu_us
        extra[key] = asdict(m)
        note(key, f"{m.rate:,.0f} mails/s; CPU us/mail: producer {m.cpu_us:,.0f}, {m.server_us()}")
    values.update(await apicases.run(base, sizes.send, sizes.send_many, note))
    drains = (
        ("drain", 1, 50, 0.0),
        ("drain_100", 1, 50, 100.0),
        ("drain_2p", 2, 50, 0.0),
        ("drain_200", 1, 200, 100.0),
    )
    for key, processes, concurrency, latency in drains:
        d = await cases.drain_case(
            base,
            mails=sizes.drain,
            processes=processes,
            concurrency=concurrency,
            latency_ms=latency,
            stall_probe=key == "drain",
        )
        values[key] = d.rate
        extra[key] = asdict(d) | {"consumer_cpu_us": d.consumer_cpu_us}
        servers = ", ".join(f"{k} {v / d.mails * 1e6:,.0f}" for k, v in d.server_cpu_s.items())
        note(
            key,
            f"{d.rate:,.0f} mails/s; CPU us/mail: consumer {d.consumer_cpu_us:,.0f}, {servers}",
        )
        if key == "drain":
            values["cpu_consumer"] = d.consumer_cpu_us
            values["rss_50"] = d.consumer_rss_kb / 1024
            values["reserve_timeout_s"] = float(base.consumer.reserve_timeout_s)  # the stall's scale
            if d.stall_s is not None:
                values["stall"] = d.stall_s
                note("stall", f"{d.stall_s * 1000:,.0f} ms")
        if key == "drain_200":
            values["rss_200"] = d.consumer_rss_kb / 1024
            note("rss_200", f"{values['rss_200']:.1f} MB")
    values |= await lonecases.run(base, 2 * sizes.send, note)  # issue 16: lone send, send_many vs raw
    # Issue 13: 2 consumer processes draining over 1 beanstalkd server, then over 2.
    for f in await fleetcases.run(base, sizes.drain, 50):
        values[f"fleet_{f.servers}"] = f.rate
        extra[f"fleet_{f.servers}"] = asdict(f)
        cpu = ", ".join(f"{k} {v / f.mails * 1e6:,.0f}" for k, v in sorted(f.cpu_s.items()))
        note(f"fleet_{f.servers}", f"{f.rate:,.0f} mails/s; CPU us/mail: {cpu}")
    values.update(await ratecases.run_all(base, note))
    values |= await consolecases.bench_rows(base, sizes.console, 20, sizes.send // 3, note)
    return values, extra


async def bench(base: Settings, runs: int, sizes: Sizes, console: Console) -> Samples:
    samples = Samples()
    for i in range(runs):
        load = loadavg()
        console.print(f"[bold]run {i + 1} of {runs}[/] (load average {load:.2f})")
        if load > 0.5:
            console.print("  [yellow]other work is running on this machine: figures will be low[/]")
        t0 = time.monotonic()
        values, extra = await one_run(base, sizes, console)
        extra["loadavg_start"] = load
        samples.runs.append(values)
        samples.extra.append(extra)
        console.print(f"  (run took {time.monotonic() - t0:.0f} s)")
    return samples


def loadavg() -> float:
    """The 1-minute load average: what else competes for the CPUs (others' tests, builds)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--runs", type=int, default=None, help="runs per case (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="a small smoke-sized matrix (about a minute)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default bench/)")
    args = p.parse_args(argv)
    base = settings_or_exit(PROG).for_test()
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        p.error("--runs must be at least 1")
    sizes = QUICK if args.quick else Sizes()
    console = Console()
    t0 = time.monotonic()
    samples = asyncio.run(bench(base, runs, sizes, console))
    config = {"runs": runs, "quick": args.quick, "sizes": asdict(sizes), "seconds": time.monotonic() - t0}
    table = write(args.out, summarise(samples), samples, config)
    print()
    print(table, end="")
    console.print(f"written to {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
