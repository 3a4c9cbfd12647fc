"""The natural group commit shared by the producer's sends, the consumer's claims and records."""

from __future__ import annotations

import asyncio

import pytest

from mailer.batching import Batcher


def recording(delay: float = 0.0) -> tuple[list[list[int]], Batcher[int, int], list[int]]:
    batches: list[list[int]] = []
    in_flight = [0, 0]  # now, max

    async def write(items: list[int]) -> list[int]:
        batches.append(items)
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        await asyncio.sleep(delay)
        in_flight[0] -= 1
        return [i * 10 for i in items]

    return batches, Batcher(write, max_batch=4), in_flight


async def test_each_caller_gets_its_own_result_and_batches_respect_their_size() -> None:
    batches, batcher, _ = recording()
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_a_caller_arriving_just_after_a_write_ends_is_not_stranded() -> None:
    # The caller resumes before the finished writer's task is cleaned up: it must still be served.
    _, batcher, _ = recording()
    for i in range(50):
        assert await asyncio.wait_for(batcher.submit(i), 1) == i * 10
    assert not batcher.busy


async def test_items_arriving_during_a_write_go_together_in_the_next() -> None:
    batches, batcher, _ = recording(delay=0.05)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)  # the first write is in flight
    rest = await asyncio.gather(*(batcher.submit(i) for i in range(1, 4)))
    assert await first == 0 and rest == [10, 20, 30]
    assert batches == [[0], [1, 2, 3]]


async def test_a_straggler_does_not_split_every_later_batch_in_two() -> None:
    """Callers that submit again as soon as they are answered: one that arrived mid-write
    once (a straggler) must be joined by the others in the next write, not written alone
    while they wait, which would then repeat for good (50 senders in batches of 49 and 1)."""
    batches: list[int] = []

    async def write(items: list[int]) -> list[int]:
        batches.append(len(items))
        await asyncio.sleep(0.002)
        return items

    batcher: Batcher[int, int] = Batcher(write, max_batch=100)

    async def caller(first_delay: float) -> None:
        await asyncio.sleep(first_delay)
        for i in range(30):
            await batcher.submit(i)

    await asyncio.gather(caller(0.001), *(caller(0) for _ in range(9)))
    assert batches[0] == 9  # the straggler was not there yet
    assert set(batches[1:-1]) == {10}, batches  # then it went with everyone (its last goes alone)


async def test_writers_bound_the_writes_in_flight() -> None:
    async def write(items: list[int]) -> list[int]:
        await asyncio.sleep(0.02)
        return items

    for writers in (1, 3):
        batcher: Batcher[int, int] = Batcher(write, max_batch=1, writers=writers)
        peak = 0

        async def watch(b: Batcher[int, int]) -> None:
            nonlocal peak
            while True:
                peak = max(peak, b._active)
                await asyncio.sleep(0.001)

        watcher = asyncio.ensure_future(watch(batcher))
        await asyncio.gather(*(batcher.submit(i) for i in range(9)))
        watcher.cancel()
        assert peak == writers


async def test_a_failed_write_fails_every_caller_of_that_batch_only() -> None:
    calls = 0

    async def write(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("MongoDB away")
        return items

    batcher: Batcher[int, int] = Batcher(write, max_batch=2, on_error=lambda e: ValueError(str(e)))
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert [type(r) for r in results[:2]] == [ValueError, ValueError]
    assert results[2:] == [2, 3]
    with pytest.raises(ValueError, match="MongoDB away"):
        raise results[0]  # type: ignore[misc]
