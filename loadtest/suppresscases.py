"""The suppression check's cost (issue 12): ``send`` at 50 concurrent callers with an empty
suppression list and with 10,000 listed addresses (none of them this run's recipients, so
every mail is stored and queued and only the check's query differs), in the same run,
interleaved, each case on a tube and collections of its own.

The check is one ``_id $in`` query per write: per group commit at 50 concurrent, so its cost
spreads over the batch. Target: the listed case keeps at least 90% of the empty one's rate.

``python -m loadtest.suppresscases --rounds 3 --mails 5000`` prints each round and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Sequence

from loadtest.common import drain_tube, drop_collections, sample_mail, settings_or_exit, unique_suffix
from loadtest.raw import Measure, timed
from mailer.config import Settings
from mailer.producer import Producer
from mailer.store import MailStore

PROG = "python -m loadtest.suppresscases"
CONCURRENCY = 50
LISTED = 10_000


class _NoCheck:
    """The producer as it was before suppression: every mail goes through unchecked."""

    async def screen(self, docs: Sequence[object]) -> list[None]:
        return [None] * len(docs)

    async def screen_all(self, docs: Sequence[object]) -> None:
        return None


async def _send_concurrently(settings: Settings, n: int, listed: int, *, check: bool = True) -> Measure:
    async with MailStore(settings) as store:
        await store.add_suppressions([f"listed{i}@example.org" for i in range(listed)], reason="bench")
    mails = [sample_mail("suppress", i) for i in range(n)]
    async with Producer(settings) as producer:
        if not check:
            setattr(producer, "_suppression", _NoCheck())  # noqa: B010 (the unchecked baseline)

        async def caller(k: int) -> None:
            for mail in mails[k::CONCURRENCY]:
                await producer.send(mail)

        async def run() -> None:
            await asyncio.gather(*(caller(k) for k in range(CONCURRENCY)))

        return await timed(n, run)


async def _case(base: Settings, kind: str, n: int, listed: int, *, check: bool = True) -> Measure:
    settings = base.for_test(unique_suffix(kind))
    try:
        return await _send_concurrently(settings, n, listed, check=check)
    finally:
        await drain_tube(settings)
        async with MailStore(settings) as store:
            for collection in (store.suppressions, store.events, store.unknown_events, store.webhook_seen):
                await collection.drop()
        await drop_collections(settings)


async def run(base: Settings, n: int, listed: int = LISTED) -> dict[str, float]:
    """One round: without, then with the listed addresses; rates and their ratio."""
    unchecked = await _case(base, "sn", n, 0, check=False)
    without = await _case(base, "sx", n, 0)
    with_list = await _case(base, "sl", n, listed)
    return {
        "send_50_no_check": unchecked.rate,
        "send_50_empty_list": without.rate,
        "send_50_listed": with_list.rate,
        "ratio": with_list.rate / without.rate if without.rate else 0.0,
        "ratio_to_no_check": with_list.rate / unchecked.rate if unchecked.rate else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--mails", type=int, default=5000, help="mails per case and round (5,000)")
    p.add_argument("--listed", type=int, default=LISTED, help="addresses on the list (10,000)")
    a = p.parse_args(argv)
    base = settings_or_exit(PROG).for_test()
    rounds: list[dict[str, float]] = []
    for i in range(a.rounds):
        row = asyncio.run(run(base, a.mails, a.listed))
        rounds.append(row)
        print(
            f"round {i + 1}: empty list {row['send_50_empty_list']:,.0f} mails/s, "
            f"{a.listed:,} listed {row['send_50_listed']:,.0f} mails/s, ratio {row['ratio']:.2f}",
            flush=True,
        )
    print("medians:")
    for key in rounds[0]:
        print(f"  {key:<20} {statistics.median(r[key] for r in rounds):,.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
