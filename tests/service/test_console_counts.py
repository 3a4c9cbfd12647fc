"""The console's shared counts per status: one count serves every view for its time, views
that come together wait for one count, and an action's drop is never undone by a count
that began before it."""

from __future__ import annotations

import asyncio

from helpers import FakeClock

from mailer.service.console.counts import SharedCounts


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> dict[str, int]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return {"queued": self.calls}


async def test_one_count_serves_every_view_for_its_time() -> None:
    clock, count = FakeClock(0.0), Counter()
    shared = SharedCounts(ttl_s=2.0, monotonic=clock)
    assert await shared.get(count) == {"queued": 1}
    clock.advance(1.9)
    assert await shared.get(count) == {"queued": 1} and count.calls == 1
    clock.advance(0.2)
    assert await shared.get(count) == {"queued": 2}


async def test_views_that_come_together_share_one_count() -> None:
    count = Counter()
    count.gate = asyncio.Event()
    shared = SharedCounts(monotonic=FakeClock(0.0))
    views = [asyncio.create_task(shared.get(count)) for _ in range(5)]
    await asyncio.sleep(0)
    count.gate.set()
    assert [await v for v in views] == [{"queued": 1}] * 5 and count.calls == 1


async def test_a_drop_is_not_undone_by_a_count_begun_before_it() -> None:
    count = Counter()
    count.gate = asyncio.Event()
    shared = SharedCounts(monotonic=FakeClock(0.0))
    early = asyncio.create_task(shared.get(count))
    await asyncio.sleep(0)
    shared.drop()  # an action changed a status while the count ran
    count.gate.set()
    assert await early == {"queued": 1}  # that view gets what it asked for...
    assert await shared.get(count) == {"queued": 2}  # ...but the next one counts afresh


async def test_a_failed_count_is_not_kept() -> None:
    calls = 0

    async def flaky() -> dict[str, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("MongoDB away")
        return {"sent": 3}

    shared = SharedCounts(monotonic=FakeClock(0.0))
    try:
        await shared.get(flaky)
    except ConnectionError:
        pass
    else:
        raise AssertionError("the failure should reach the view")
    assert await shared.get(flaky) == {"sent": 3}
