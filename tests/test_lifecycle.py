"""``stop_tasks``: background tasks end even when a cancel is lost, and a shutdown never hangs
on one that will not end.

Python 3.11's ``asyncio.wait_for`` (inside every pymongo socket read) drops a cancel that lands
as the read completes; the real-server test below reproduces that on nx-27017 and fails
(a loop still running after its bound) with a single ``task.cancel()`` and ``await task``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from mailer.config import Settings
from mailer.lifecycle import stop_tasks
from mailer.store import MailStore

pytestmark = pytest.mark.timeout(60)


async def test_a_task_that_lost_its_cancel_is_cancelled_again() -> None:
    lost = 0

    async def loop() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost == 0:  # what wait_for does on 3.11: the cancel is gone, the loop goes on
                    lost += 1
                    continue
                raise

    task = asyncio.get_running_loop().create_task(loop())
    await asyncio.sleep(0.02)
    started = time.monotonic()
    await stop_tasks([task], within=5.0)
    assert task.cancelled() and lost == 1
    assert time.monotonic() - started < 1.0


async def test_a_task_that_never_ends_is_left_behind_after_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.get_running_loop().create_task(stubborn())
    await asyncio.sleep(0.02)  # running: a task cancelled before it starts never runs at all
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mailer.lifecycle"):
        await stop_tasks([task], within=0.3)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert not task.done() and "still running after 0.3 s" in caplog.text
    release.set()
    await asyncio.wait_for(task, 2)


async def test_a_task_that_failed_is_logged_and_the_others_still_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    loop = asyncio.get_running_loop()
    failed = loop.create_task(fails(), name="fails")
    sleeper = loop.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="mailer.lifecycle"):
        await stop_tasks([failed, sleeper])
    assert sleeper.cancelled()
    assert "background task fails ended with an error" in caplog.text and "boom" in caplog.text


async def test_loops_of_real_finds_always_stop(settings: Settings) -> None:
    async with MailStore(settings) as store:
        await store.mails.insert_many([{"n": i} for i in range(200)])
        stopped = 0
        for i in range(60):

            async def reads() -> None:
                while True:
                    await store.mails.find({"n": {"$gte": 0}}).to_list()

            task = asyncio.get_running_loop().create_task(reads())
            await asyncio.sleep(0.001 + (i % 20) * 0.001)  # land inside reads at varied points
            await stop_tasks([task], within=3.0)
            stopped += task.done()
        assert stopped == 60
