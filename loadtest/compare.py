"""``python -m loadtest.compare --before REV`` (``make bench-compare BEFORE=REV``): the bench
matrix of an earlier commit and of this tree, in interleaved rounds.

Two separate ``make bench`` runs cannot say whether a ratio got worse: their raw baselines
are measured at different times, and on a shared machine they swing by up to 2-3x within an
hour while the code differs by a few percent. Here each round runs one bench of each tree
back to back (the order alternates, ABBA), and each row of a round is set against one
baseline for both sides, the geometric mean of the two runs' measurements of it. Both sides'
baselines are this tree's code (``loadtest/raw.py`` is placed over the earlier tree's), so
what differs between the sides is the code under test. A row's verdict is the median over
the rounds of after / before (higher is better for rates, lower for times and CPU).

``--by-case`` interleaves finer: each case of the matrix (send, send_many and the four drains)
runs in a fresh process of one tree and then of the other, seconds apart, and the verdict is
the median of those adjacent pairs' after / before. On a machine whose speed drifts within
minutes (the same baseline code's CPU per operation moved 40% between two runs of one round)
this is the steadier judge; it needs ``loadtest.cases`` as it is from 296a4e4 on.

Writes ``bench/compare.json`` (every run's values) and ``bench/compare.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.report import ROWS, Row, Samples

PROG = "python -m loadtest.compare"
ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench"
LOWER_IS_BETTER_UNITS = {"us", "ms", "s", "MB", "x"}
Rounds = Sequence[tuple[dict[str, float], dict[str, float]]]  # (before, after) figures per round


def lower_is_better(row: Row) -> bool:
    if row.kind == "max_ratio":
        return True
    if row.kind == "min_ratio":
        return False
    return row.unit in LOWER_IS_BETTER_UNITS


def _shared_baseline(row: Row, before: dict[str, float], after: dict[str, float]) -> float | None:
    """One baseline for both sides of a round: a fixed scale as it is, a measured one as the
    geometric mean of the two runs' figures (then after/before is the ratio of the rows)."""
    samples = Samples()
    b, a = samples.baseline(row, before), samples.baseline(row, after)
    if b is None or a is None or b <= 0 or a <= 0:
        return None
    return math.sqrt(a * b)


# Run inside the tree under test (its own loadtest.cases and mailer): one case, its figures as JSON.
CASE_RUNNER = """
import asyncio, json, sys
from loadtest import cases
from loadtest.common import settings_or_exit

DRAINS = {"drain": (1, 50, 0.0), "drain_100": (1, 50, 100.0), "drain_2p": (2, 50, 0.0),
          "drain_200": (1, 200, 100.0)}

async def main(case, n):
    base = settings_or_exit("loadtest.compare").for_test()
    if case in ("send", "send_many"):
        m = await cases.producer_case(base, case, n)
        return {case: m.rate, "cpu_" + case: m.cpu_us}
    processes, concurrency, latency = DRAINS[case]
    d = await cases.drain_case(base, mails=n, processes=processes, concurrency=concurrency,
                               latency_ms=latency, stall_probe=False)
    out = {case: d.rate}
    if case == "drain":
        out["cpu_consumer"] = d.consumer_cpu_us
    return out

print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2])))))
"""
CASES = ("send", "send_many", "drain", "drain_100", "drain_2p", "drain_200")


def run_case(tree: Path, case: str, n: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [sys.executable, "-c", CASE_RUNNER, case, str(n)],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def _verdict(
    row: Row, baseline: str, before: list[float], after: list[float], change: list[float]
) -> dict[str, Any]:
    """A row of the table: medians of each side and of after / before, judged in the row's
    direction."""
    lower, median = lower_is_better(row), statistics.median(change)
    return {
        "key": row.key,
        "label": row.label,
        "baseline": baseline,
        "lower_is_better": lower,
        "before": statistics.median(before),
        "after": statistics.median(after),
        "change": median,
        "changes": change,
        "no_worse": median <= 1.0 if lower else median >= 1.0,
    }


def _pairs(row: Row, rounds: Rounds) -> list[tuple[float, float]]:
    """The row's (before, after) in every round, or none if a round lacks it on either side."""
    pairs = [(b.get(row.key), a.get(row.key)) for b, a in rounds]
    if not pairs or any(b is None or a is None or b <= 0 for b, a in pairs):
        return []
    return [(b, a) for b, a in pairs if b is not None and a is not None]


def changes(rounds: Rounds) -> list[dict[str, Any]]:
    """Per row measured on both sides in every round: the median of after / before (the
    rounds' adjacent pairs), and whether that is no worse in the row's direction."""
    out: list[dict[str, Any]] = []
    for row in ROWS:
        if pairs := _pairs(row, rounds):
            before, after = [b for b, _ in pairs], [a for _, a in pairs]
            out.append(_verdict(row, "adjacent run", before, after, [a / b for b, a in pairs]))
    return out


def compare(rounds: Rounds) -> list[dict[str, Any]]:
    """Per row with a baseline and a value on both sides in every round: each side's ratio to
    the round's shared baseline (medians over the rounds), and the median of after / before
    with whether that is no worse."""
    out: list[dict[str, Any]] = []
    for row in ROWS:
        pairs = _pairs(row, rounds) if row.baseline is not None else []
        bases = [_shared_baseline(row, b, a) for b, a in rounds]
        if not pairs or any(base is None for base in bases):
            continue
        shared = [base for base in bases if base is not None]
        before = [b / base for (b, _), base in zip(pairs, shared, strict=True)]
        after = [a / base for (_, a), base in zip(pairs, shared, strict=True)]
        out.append(_verdict(row, str(row.baseline), before, after, [a / b for b, a in pairs]))
    return out


def markdown(rows: list[dict[str, Any]], before: str, after: str, n: int, *, by_case: bool = False) -> str:
    what = (
        "each case run in one tree, then at once in the other (ABBA); before and after are "
        "the rows' medians (mails/s, us)"
        if by_case
        else "ratios to one baseline per round shared by both sides (medians)"
    )
    lines = [
        f"Interleaved bench, {n} round(s): before = {before}, after = {after}; {what}; "
        "change = after / before, median of the rounds (each round's in brackets).",
        "",
        "| row | baseline | before | after | change | better is | no worse |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = ", ".join(f"{c:.3f}" for c in r["changes"])
        lines.append(
            f"| {r['label']} | {r['baseline']} | {r['before']:,.3f} | {r['after']:,.3f} | "
            f"{r['change']:.3f} ({each}) | {'lower' if r['lower_is_better'] else 'higher'} | "
            f"{'yes' if r['no_worse'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def export(rev: str, into: Path) -> Path:
    """``rev``'s tree in ``into`` (git archive: the checkout itself is not touched), with this
    tree's raw baselines over its own."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.copy2(ROOT / "loadtest" / "raw.py", into / "loadtest" / "raw.py")
    return into


def run_bench(tree: Path, out: Path, extra: Sequence[str]) -> dict[str, float]:
    """One run of ``tree``'s bench, on this interpreter, its children importing ``tree`` too."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "loadtest.bench", "--runs", "1", "--out", str(out), *extra]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    runs: list[dict[str, float]] = json.loads((out / "results.json").read_text())["runs"]
    return runs[0]


def _case_size(case: str, quick: bool) -> int:
    from loadtest.bench import QUICK, Sizes

    sizes = QUICK if quick else Sizes()
    return {"send": sizes.send, "send_many": sizes.send_many}.get(case, sizes.drain)


def short_rev(rev: str) -> str:
    """``rev`` as a short commit id (or as given, if git cannot resolve it)."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True, check=False
    ).stdout.strip()
    return sha or rev


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, one bench of each side per round")
    p.add_argument("--quick", action="store_true", help="both sides' --quick matrix (a smoke run)")
    p.add_argument(
        "--by-case",
        action="store_true",
        help="interleave each case, not whole runs",
    )
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default bench/)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    extra = ["--quick"] if args.quick else []
    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    t0 = time.monotonic()
    try:
        try:
            before_tree = export(args.before, work / "before")
        except subprocess.CalledProcessError as exc:
            print(f"{PROG}: cannot export {args.before!r}: {exc.stderr.decode(errors='replace').strip()}")
            return 2
        trees = {"before": before_tree, "after": ROOT}
        rounds: list[tuple[dict[str, float], dict[str, float]]] = []
        for i in range(args.rounds):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            got: dict[str, dict[str, float]] = {"before": {}, "after": {}}
            if args.by_case:
                for case in CASES:
                    for side in order:
                        print(f"round {i + 1} of {args.rounds}: {case}, {side} ...", flush=True)
                        got[side] |= run_case(trees[side], case, _case_size(case, args.quick))
            else:
                for side in order:
                    print(f"round {i + 1} of {args.rounds}: {side} ...", flush=True)
                    got[side] = run_bench(trees[side], work / f"{side}-{i}", extra)
            rounds.append((got["before"], got["after"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = changes(rounds) if args.by_case else compare(rounds)
    before_label, after_label = short_rev(args.before), short_rev("HEAD") + " (this tree)"
    table = markdown(rows, before_label, after_label, len(rounds), by_case=args.by_case)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(table)
    data = {
        "by_case": args.by_case,
        "before": before_label,
        "after": after_label,
        "seconds": time.monotonic() - t0,
        "rows": rows,
        "rounds": [{"before": b, "after": a} for b, a in rounds],
    }
    (args.out / "compare.json").write_text(json.dumps(data, indent=1) + "\n")
    print(table, end="")
    print(f"written to {args.out / 'compare.json'} and {args.out / 'compare.md'}")
    return 0 if all(r["no_worse"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
