"""``python -m loadtest.instructions --before REV`` (``make bench-instructions BEFORE=REV``):
the work per mail of the producer, the consumer and MongoDB, counted in instructions, for an
earlier commit and this tree.

CPU time on a shared machine moves 10-40% between runs minutes apart, so a change of a few
percent in a client's CPU per mail cannot be told from noise, even over interleaved rounds
(``loadtest.compare``). The instructions a process executes do not depend on what else the
machine runs: here each side's producer (``send`` from 50 tasks, ``send_many`` in batches of
1,000) and consumer (50 reserve loops, simulated vendors, 0 ms) run under valgrind
(cachegrind, no cache simulation: Debian's ``valgrind``), on the same local services as the
bench, once with a small and once with a large number of mails. Start-up, warm-up and
shut-down are the same in both runs, so the per-mail figure is the difference of the two
counts over the difference of the mail counts. The ``server`` case counts MongoDB's side
instead: a private nx-27017 under valgrind while each side's producer stores the mails and
its consumer (not counted) delivers them, the work that bounds the 0 ms drains here.

Instructions are not time (a cache miss costs more than an add), so this judges how much
work the code does, and the bench's CPU rows how long it took. Timing still shapes the work
a little: concurrent sends and the consumer's loops share their writes in batches whose
sizes depend on how fast each side runs, so the same code's count moves between repeats
(``--repeats`` shows it): measured here 0.3% for ``send``, 1% for ``send_many`` and the
server, up to 4% for the consumer.

Writes ``bench/instructions.json`` and ``bench/instructions.md``; exit 1 if a row of this
tree is above the earlier tree's by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest.common import free_port
from loadtest.compare import ROOT, export, short_rev

PROG = "python -m loadtest.instructions"
OUT_DIR = ROOT / "bench"
CASES = ("send", "send_many", "drain", "server")
SIZES = {"send": (1000, 5000), "send_many": (1000, 5000), "drain": (1000, 3000), "server": (1000, 3000)}
LABELS = {
    "send": "producer send, 50 concurrent",
    "send_many": "producer send_many, batches of 1,000",
    "drain": "consumer drain, c=50, 0 ms vendor",
    "server": "nx-27017 per mail stored and delivered",
}
_IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")

# Run inside the tree under test (its own mailer and loadtest.common), as the whole process
# valgrind counts: warm up (connections, indexes, caches), then send; the scratch tube and
# collections are emptied by the parent afterwards, outside the count.
PRODUCER = """
import asyncio, gc, sys
from loadtest.common import sample_mail, settings_or_exit
from mailer.producer import Producer

async def main(mode, n, suffix):
    settings = settings_or_exit("loadtest.instructions").for_test(suffix)
    mails = [sample_mail("instr", i) for i in range(n)]
    async with Producer(settings) as producer:
        await producer.send_many([sample_mail("instr", n)])
        gc.collect()
        gc.freeze()  # as the bench's timed sections: the start-up heap is not walked again
        if mode == "send_many":
            for i in range(0, n, 1000):
                await producer.send_many(mails[i : i + 1000])
        else:
            pending = iter(mails)
            async def worker():
                for mail in pending:
                    await producer.send(mail)
            await asyncio.gather(*(worker() for _ in range(50)))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""

# Run inside the tree under test: store and queue the mails, then start a consumer that
# drains them (under valgrind, or not when the server is the one counted), stopped with
# SIGTERM once the tube is empty.
DRAIN = """
import asyncio, json, signal, subprocess, sys, time
from loadtest.common import child_env, sample_mail, settings_or_exit, tube_stats
from mailer.beanstalk import Beanstalk
from mailer.producer import Producer

async def main(n, suffix, valgrind):
    settings = settings_or_exit("loadtest.instructions").for_test(suffix)
    async with Producer(settings) as producer:
        for i in range(0, n, 1000):
            await producer.send_many([sample_mail("instr", j) for j in range(i, min(n, i + 1000))])
    env = child_env(settings, latency_ms=0.0)
    env["MAILER_MEASURE_THROUGHPUT"] = "false"
    cmd = [*valgrind, sys.executable, "-m", "mailer.consumer", "--test", "--concurrency", "50",
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    b = settings.beanstalkd
    deadline = time.monotonic() + 120 + n * 0.1
    try:
        async with Beanstalk(b.host, b.port) as bs:
            while True:
                s = await tube_stats(bs, b.tube)
                busy = sum(s.get(k, 0) for k in ("current-jobs-ready", "current-jobs-reserved",
                                                 "current-jobs-delayed"))
                if busy == 0 and s.get("cmd-delete", 0) >= n:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the consumer did not drain {n} mails (exit {proc.poll()})")
                await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)

asyncio.run(main(int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])))
"""

# Run inside the tree under test, after a count: the scratch tube and collections go.
CLEAN = """
import asyncio, sys
from loadtest.common import drain_tube, drop_collections, settings_or_exit

async def main(suffix):
    settings = settings_or_exit("loadtest.instructions").for_test(suffix)
    await drain_tube(settings)
    await drop_collections(settings)

asyncio.run(main(sys.argv[1]))
"""


def valgrind_cmd(log: Path) -> list[str]:
    exe = shutil.which("valgrind")
    if exe is None:
        raise SystemExit(
            f"{PROG}: valgrind is not installed (apt-get install valgrind; the make target does)"
        )
    return [
        exe,
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        f"--log-file={log}",
    ]


def instructions(log: Path) -> int:
    """The program's instruction count from valgrind's summary."""
    found = _IREFS.findall(log.read_text())
    if not found:
        raise SystemExit(f"{PROG}: no instruction count in {log}:\n{log.read_text()[-2000:]}")
    return int(found[-1].replace(",", ""))


def _server_count(tree: Path, n: int, work: Path, log: Path, env: dict[str, str], suffix: str) -> int:
    """A private nx-27017 under valgrind while ``tree`` stores and delivers ``n`` mails."""
    port, data = free_port(), work / f"nx{suffix}"
    data.mkdir()
    exe = str(Path(sys.executable).parent / "nx-27017")
    argv = [
        exe,
        "--data-dir",
        str(data),
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
        "--log-file",
        str(data / "nx.log"),
    ]
    server = subprocess.Popen(
        [*valgrind_cmd(log), sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{PROG}: nx-27017 under valgrind did not open port {port}") from None
                time.sleep(0.2)
        # Slow under valgrind: MongoDB operations get a bound they cannot reach.
        private = {
            "MAILER_MONGODB__URI": f"mongodb://127.0.0.1:{port}/mailer",
            "MAILER_MONGODB__TIMEOUT_MS": "300000",
        }
        cmd = [sys.executable, "-c", DRAIN, str(n), suffix, "[]"]
        subprocess.run(cmd, cwd=tree, env=env | private, check=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=300)
        shutil.rmtree(data, ignore_errors=True)
    return instructions(log)


def count(tree: Path, case: str, n: int, work: Path) -> int:
    """Instructions of one run of ``case`` with ``n`` mails in ``tree``."""
    suffix = f"_in_{os.getpid()}_{time.monotonic_ns() % 10**9}"
    log = work / f"{case}-{n}{suffix}.log"
    env = dict(os.environ, PYTHONPATH=str(tree))
    try:
        if case == "server":
            return _server_count(tree, n, work, log, env, suffix)
        if case == "drain":
            cmd = [sys.executable, "-c", DRAIN, str(n), suffix, json.dumps(valgrind_cmd(log))]
        else:
            cmd = [*valgrind_cmd(log), sys.executable, "-c", PRODUCER, case, str(n), suffix]
        subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        return instructions(log)
    finally:
        subprocess.run([sys.executable, "-c", CLEAN, suffix], cwd=tree, env=env, check=False)


def per_mail(tree: Path, case: str, work: Path) -> float:
    small, large = SIZES[case]
    return (count(tree, case, large, work) - count(tree, case, small, work)) / (large - small)


@dataclass(slots=True)
class Row:
    case: str
    label: str
    before: list[float]  # instructions per mail, one figure per repeat
    after: list[float]
    change: float  # median after / median before
    no_worse: bool


def _cell(figures: list[float]) -> str:
    each = ", ".join(f"{x / 1000:,.1f}" for x in figures)
    return f"{statistics.median(figures) / 1000:,.1f} k ({each})"


def markdown(rows: list[Row], before: str, after: str, repeats: int) -> str:
    sizes = "; ".join(f"{case} {small:,} and {large:,}" for case, (small, large) in SIZES.items())
    lines = [
        f"Instructions per mail (valgrind; the difference of two runs' counts over the difference "
        f"of their mails: {sizes}), before = {before}, after = {after}; median of {repeats} "
        "repeat(s) per side (each in brackets); change = after / before, lower is better.",
        "",
        "| row | before | after | change | no worse |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "yes" if r.no_worse else "**no**"
        lines.append(f"| {r.label} | {_cell(r.before)} | {_cell(r.after)} | {r.change:.3f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--repeats", type=int, default=1, help="per-mail figures per side and case")
    p.add_argument("--tolerance", type=float, default=0.02, help="how far above before a row may be (0.02)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default bench/)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    t0 = time.monotonic()
    try:
        try:
            trees = {"before": export(args.before, work / "before"), "after": ROOT}
        except subprocess.CalledProcessError as exc:
            print(f"{PROG}: cannot export {args.before!r}: {exc.stderr.decode(errors='replace').strip()}")
            return 2
        rows: list[Row] = []
        for case in args.cases:
            got: dict[str, list[float]] = {"before": [], "after": []}
            for i in range(args.repeats):
                for side in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    print(f"{case}, {side}, repeat {i + 1} of {args.repeats} ...", flush=True)
                    got[side].append(per_mail(trees[side], case, work))
            change = statistics.median(got["after"]) / statistics.median(got["before"])
            rows.append(
                Row(case, LABELS[case], got["before"], got["after"], change, change <= 1 + args.tolerance)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before, after = short_rev(args.before), short_rev("HEAD") + " (this tree)"
    table = markdown(rows, before, after, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instructions.md").write_text(table)
    data = {
        "before": before,
        "after": after,
        "seconds": time.monotonic() - t0,
        "sizes": SIZES,
        "rows": [asdict(r) for r in rows],
    }
    (args.out / "instructions.json").write_text(json.dumps(data, indent=1) + "\n")
    print(table, end="")
    print(f"written to {args.out / 'instructions.json'} and {args.out / 'instructions.md'}")
    return 0 if all(r.no_worse for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
