"""The console's speed: page times with many stored mails, and what its index costs ``send``.

``python -m loadtest.consolecases [--mails 100000] [--runs 20] [--sends 3000]`` stores
``--mails`` mails directly (``insert_many`` of the store's own documents, with a spread of
statuses, vendors, recipients and batches), serves the app on uvicorn in this process and
times, median of ``--runs``: the first page (50 rows), a page 1,000 rows deep (reached by
following "Older" links, as a user would) and a filtered page (status failed, recipient
prefix), each as a ratio to the 150 ms budget. Then ``send`` from 50 tasks with the console's
indexes (``queued_ts``, and ``(status, queued_ts)`` in place of ``status``) and without them
(alternating, 3 runs each): their cost as a ratio.
Every figure is a ratio, so pass/fail carries across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import random
import re
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable, Sequence

import httpx
import uvicorn

from loadtest.cases import scratch
from loadtest.common import sample_mail
from mailer.config import ApiSettings, Settings, load_settings
from mailer.models import Status, parse_email
from mailer.producer import Producer
from mailer.service import create_app
from mailer.store import MailStore

BUDGET_S = 0.150
INDEX_BUDGET = 0.10  # the index may cost send at most 10% of its rate
OLDER = re.compile(r'href="/\?([^"]*after=[^"]*)" class="button" rel="next"')
VENDORS = ("amazon", "mailgun", "sendinblue", "sparkpost")


def _docs(n: int, start: int, ts: float) -> list[dict[str, object]]:
    """One producer batch as stored: one ``queued_ts``, statuses mostly sent."""
    rng = random.Random(start)
    docs = []
    for i in range(start, start + n):
        doc = MailStore.new_document(parse_email(sample_mail("console", i)), priority=1024)
        doc["queued_ts"] = ts
        roll = rng.random()
        if roll < 0.8:
            doc.update(status=Status.SENT.value, vendor=VENDORS[i % 4], message_id=f"sim-{i}")
        elif roll < 0.9:
            doc.update(status=Status.FAILED.value, error="gave up after 5 rounds")
        docs.append(doc)
    return docs


async def fill(store: MailStore, total: int) -> None:
    t0 = time.time() - total / 1000
    for k, start in enumerate(range(0, total, 1000)):
        await store.mails.insert_many(_docs(min(1000, total - start), start, t0 + k), ordered=False)


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


async def median_s(client: httpx.AsyncClient, path: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        answer = await client.get(path)
        times.append(time.perf_counter() - t0)
        if answer.status_code != 200:
            raise RuntimeError(f"{path}: {answer.status_code}")
    return statistics.median(times)


async def deep_path(client: httpx.AsyncClient, pages: int) -> str:
    path = "/"
    for _ in range(pages):
        found = OLDER.search((await client.get(path)).text)
        if found is None:
            raise RuntimeError("fewer mails than the deep page needs")
        path = "/?" + html.unescape(found.group(1))
    return path


async def page_times(base: Settings, mails: int, runs: int) -> dict[str, float]:
    async with scratch(base, "console") as settings:
        open_api = settings.model_copy(update={"api": ApiSettings(keys=[])})  # loopback, signed in
        async with MailStore(open_api) as store:
            t0 = time.perf_counter()
            await fill(store, mails)
            print(f"stored {mails:,} mails in {time.perf_counter() - t0:.1f} s")
        async with serving(open_api) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
            deep = await deep_path(client, 20)  # 20 pages of 50: 1,000 rows deep
            return {
                "first page": await median_s(client, "/", runs),
                "page 1,000 rows deep": await median_s(client, deep, runs),
                "status failed + recipient prefix": await median_s(
                    client, "/?status=failed&rcpt=user1*", runs
                ),
            }


CONSOLE_KEYS = ([("queued_ts", 1)], [("status", 1), ("queued_ts", -1)])


async def without_console_indexes(store: MailStore) -> None:
    """The mails collection as it would be with no console: no ``queued_ts`` index, and
    ``status`` alone where the console's compound ``(status, queued_ts)`` now serves it."""
    for name, info in (await store.mails.index_information()).items():
        if [tuple(k) for k in info["key"]] in [[tuple(k) for k in keys] for keys in CONSOLE_KEYS]:
            await store.mails.drop_index(name)
    await store.mails.create_index("status")


async def send_rate(base: Settings, n: int, *, with_index: bool) -> float:
    async with scratch(base, "cidx") as settings, Producer(settings) as producer:
        if not with_index:
            await without_console_indexes(producer.store)
        mails = [sample_mail("cidx", i) for i in range(n)]
        queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        for m in mails:
            queue.put_nowait(m)

        async def worker() -> None:
            while not queue.empty():
                await producer.send(queue.get_nowait())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(50)))
        return n / (time.perf_counter() - t0)


PAGE_ROWS = {
    "first page": "console_first_ms",
    "page 1,000 rows deep": "console_deep_ms",
    "status failed + recipient prefix": "console_filtered_ms",
}


async def index_cost(base: Settings, sends: int, rounds: int = 3) -> tuple[float, float]:
    """Median ``send`` rates (50 tasks) with the console's indexes and without, alternating."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for with_index in (True, False):
            rates[with_index].append(await send_rate(base, sends, with_index=with_index))
    return statistics.median(rates[True]), statistics.median(rates[False])


async def bench_rows(
    base: Settings, mails: int, runs: int, sends: int, note: Callable[[str, str], None]
) -> dict[str, float]:
    """The bench's console rows: page times in ms (the budget is the baseline) and ``send``
    with and without the console's indexes."""
    times = await page_times(base, mails, runs)
    values = {PAGE_ROWS[name]: seconds * 1000 for name, seconds in times.items()}
    note(
        "console", ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in times.items()) + f" ({mails:,} mails)"
    )
    values["send_console_idx"], values["send_no_console_idx"] = await index_cost(base, sends)
    note(
        "console_idx",
        f"send {values['send_console_idx']:,.0f} mails/s with the console's indexes, "
        f"{values['send_no_console_idx']:,.0f} without",
    )
    return values


async def run(mails: int, runs: int, sends: int) -> None:
    base = load_settings(test=True)
    times = await page_times(base, mails, runs)
    print(
        f"\n| page ({mails:,} mails, median of {runs}) | server time | / 150 ms | pass |\n|---|---|---|---|"
    )
    for name, seconds in times.items():
        ratio = seconds / BUDGET_S
        print(f"| {name} | {seconds * 1000:.1f} ms | {ratio:.2f} | {'yes' if ratio <= 1 else '**no**'} |")
    on, off = await index_cost(base, sends)
    cost = 1 - on / off
    print(
        f"\nsend, 50 concurrent, {sends:,} mails: {on:,.0f} mails/s with the console's indexes, "
        f"{off:,.0f} without: cost {cost:.1%} (target <= {INDEX_BUDGET:.0%}: "
        f"{'yes' if cost <= INDEX_BUDGET else 'no'})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.consolecases", description=__doc__)
    p.add_argument("--mails", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--sends", type=int, default=3000)
    args = p.parse_args(argv)
    asyncio.run(run(args.mails, args.runs, args.sends))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
