"""The send-rate and throttling cases (issue 9, items 3, 4 and 6), run by ``make bench`` and
alone by ``python -m loadtest.ratecases``.

- ``rate_limit``: 2 consumer processes, 4 simulated vendors, ``mailgun`` limited to 50/s,
  4,000 mails (1,000 routed to mailgun by round robin). What mailgun saw is read from the
  stored attempts (when each send returned): the most sends in any sliding 1-second window
  after the first second (target <= 55) and the average rate (target >= 45/s); the other
  vendors' rates are reported beside it.
- ``throttle``: 200 mails over 4 vendors while ``mailgun`` throttles 30% of its sends with
  ``Retry-After: 1``, under the production cooldown of 10 minutes: every mail sent, the
  time until the last job is deleted (target <= 30 s), and the longest vendor mark seen
  meanwhile (target: a few seconds, not the cooldown).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtest import children
from loadtest.cases import _wait_deleted, scratch
from loadtest.common import child_env, settings_or_exit
from loadtest.raw import mail_docs
from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.store import MailStore

LIMITED = "mailgun"
LIMIT = 50.0  # sends per second, the scale of the rate rows
THROTTLE_RETRY_AFTER_S = 1.0
THROTTLE_BUDGET_S = 30.0  # the "settled within 30 s"
Note = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Outcome:
    seconds: float  # first put to last delete
    sent: int
    sends: dict[str, list[float]]  # vendor -> epoch seconds of each sent attempt
    longest_mark_s: float


def max_in_sliding_second(times: list[float], skip_s: float = 1.0) -> int:
    """The most sends in any window [t, t + 1 s) that starts after the first ``skip_s``."""
    times = sorted(times)
    if not times:
        return 0
    start = times[0] + skip_s
    return max((bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times) if t >= start), default=0)


def average_rate(times: list[float]) -> float:
    span = max(times) - min(times) if len(times) > 1 else 0.0
    return (len(times) - 1) / span if span > 0 else 0.0


async def _run(base: Settings, mails: int, env_extra: dict[str, str]) -> Outcome:
    """Store the mails, start 2 consumers, put every job at once and wait for the deletes,
    watching the vendor marks; then read what each vendor sent from the attempts."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-rate-"))
    async with scratch(base, "rt") as settings, MailStore(settings) as store:
        docs = mail_docs(mails, "rate")
        await store.mails.insert_many(docs)
        env = child_env(settings, measure_throughput=False) | env_extra
        consumers = await children.start_consumers(2, 50, env, log_dir)
        longest = 0.0
        b = settings.beanstalkd
        try:
            await children.wait_watching(settings, 100, 60.0, consumers)
            async with Beanstalk(b.host, b.port) as bs:
                await bs.use(b.tube)
                t0 = time.monotonic()
                await bs.put_many([str(d["_id"]).encode() for d in docs])
                waiting = asyncio.ensure_future(_wait_deleted(bs, b.tube, mails, 120.0))
                while not waiting.done():
                    now = time.time()
                    for until, _ in (await store.vendor_marks()).values():
                        longest = max(longest, until - now)
                    await asyncio.wait([waiting], timeout=0.2)
                t1 = waiting.result()
            async for mark in store.vendor_status.find({}):
                longest = max(longest, float(mark.get("until", 0.0)) - float(mark.get("marked_at", 0.0)))
        except BaseException:
            await children.stop(consumers)
            print(f"consumer logs kept in {log_dir}", file=sys.stderr)
            raise
        await children.stop(consumers)
        sends: dict[str, list[float]] = {}
        sent = 0
        async for doc in store.mails.find({}, {"status": 1, "attempts": 1}):
            sent += doc.get("status") == "sent"
            for a in doc.get("attempts") or []:
                if a.get("outcome") == "sent":
                    sends.setdefault(str(a["vendor"]), []).append(a["finished_at"].timestamp())
        await store.rate_windows.drop()
    shutil.rmtree(log_dir, ignore_errors=True)
    return Outcome(t1 - t0, sent, sends, longest)


async def rate_limit_case(base: Settings, note: Note) -> dict[str, float]:
    env = {"MAILER_SIMULATION__MAX_PER_SECOND": json.dumps({LIMITED: LIMIT})}
    out = await _run(base, 4000, env)
    limited = out.sends.get(LIMITED, [])
    others = {v: average_rate(t) for v, t in out.sends.items() if v != LIMITED}
    values = {
        "rate_max_1s": float(max_in_sliding_second(limited)),
        "rate_avg": average_rate(limited),
        "rate_others_min": min(others.values(), default=0.0),
        "rate_limit": LIMIT,
    }
    note(
        "rate_limit",
        f"{LIMITED} limited to 50/s: {len(limited)} sends, at most {values['rate_max_1s']:.0f} in any "
        f"sliding second (target <= 55), {values['rate_avg']:.1f}/s on average (target >= 45); others: "
        + ", ".join(f"{v} {len(out.sends[v])} at {r:,.0f}/s" for v, r in sorted(others.items())),
    )
    return values


async def throttle_case(base: Settings, note: Note) -> dict[str, float]:
    env = {
        "MAILER_SIMULATION__THROTTLE_RATE": json.dumps({LIMITED: 0.3}),
        "MAILER_SIMULATION__THROTTLE_RETRY_AFTER_S": str(THROTTLE_RETRY_AFTER_S),
        "MAILER_CONSUMER__VENDOR_COOLDOWN_S": "600",  # the production cooldown: not an outage
    }
    out = await _run(base, 200, env)
    values = {
        "throttle_settle_s": out.seconds,
        "throttle_sent": float(out.sent),
        "throttle_mark_s": out.longest_mark_s,
        "throttle_budget_s": THROTTLE_BUDGET_S,
        "throttle_retry_after_s": THROTTLE_RETRY_AFTER_S,
    }
    note(
        "throttle",
        f"{out.sent} of 200 sent in {out.seconds:.1f} s (target: all, <= 30 s); longest vendor mark "
        f"{out.longest_mark_s:.1f} s (target: a few seconds)",
    )
    return values


async def run_all(base: Settings, note: Note) -> dict[str, float]:
    return await rate_limit_case(base, note) | await throttle_case(base, note)


def main() -> int:
    base = settings_or_exit("python -m loadtest.ratecases").for_test()

    def note(key: str, text: str) -> None:
        print(f"  {key:<16} {text}")

    values = asyncio.run(run_all(base, note))
    print(json.dumps(values, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
