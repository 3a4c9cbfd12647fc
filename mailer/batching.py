"""Natural group commit: many concurrent callers, one round trip per batch.

The first caller's item is written at once; callers arriving while a write is in flight
wait and go together in the next one. There is no timer: an idle system answers a lone
caller with no added latency, and a busy one batches itself in proportion to the load.
This is what lets 50 reserve loops share one ``update_many`` claim and one ``bulk_write``
record, and 50 ``send`` calls share one ``insert_many``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``await batcher.submit(item)`` returns ``write(batch)[i]`` for that item.

    ``write`` gets at most ``max_batch`` items, and (with ``weigh``) at most ``max_weight`` of
    total weight unless one item alone weighs more (it then goes alone): one huge item never
    drags its neighbours into a write too big to finish in time. It returns one result per
    item, in order; if it raises, every caller of that batch gets a copy made by ``on_error``. Up to
    ``writers`` writes may be in flight at once: more cut the wait of a caller that arrives
    just after a write left (latency), fewer make bigger batches (less work per item).
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 200,
        max_weight: int = 0,
        weigh: Callable[[T], int] | None = None,
        writers: int = 1,
        on_error: Callable[[BaseException], BaseException] = lambda exc: exc,
    ) -> None:
        self._write = write
        self.max_batch = max_batch
        self.max_weight = max_weight
        self._weigh = weigh
        self.writers = writers
        self._on_error = on_error
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Counted by the writers themselves, not by task completion: a done-callback runs a
        # loop iteration late, and an item submitted in between would wait forever.
        self._active = 0

    @property
    def busy(self) -> bool:
        return self._active > 0

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if self._active < self.writers:
            self._active += 1
            task = loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            await self._drain_waiting()
        finally:
            self._active -= 1

    async def _drain_waiting(self) -> None:
        while self._waiting:
            await self._write_next()
            if 0 < len(self._waiting) < self.max_batch:
                # One loop iteration before the next write, so the callers the last write just
                # answered can join it. Without it, a caller that arrived mid-write is written
                # alone at once, the others arrive during that write, and the split holds for
                # good: 50 senders settled into batches of 49 and 1, twice the round trips.
                await asyncio.sleep(0)

    async def _write_next(self) -> None:
        """One write of the items waiting longest; every caller of it gets its answer."""
        n = take([item for item, _ in self._waiting[: self.max_batch]], self.max_weight, self._weigh)
        batch = self._waiting[:n]
        del self._waiting[:n]
        try:
            results = await self._write([item for item, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(self._on_error(exc))
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self, within: float | None = None) -> None:
        """Wait (at most ``within`` seconds) for the writes already accepted."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=within)


def take(items: Sequence[T], max_weight: int, weigh: Callable[[T], int] | None) -> int:
    """How many of ``items``, from the first, fit in ``max_weight`` (at least one)."""
    if weigh is None or max_weight <= 0:
        return len(items)
    total = 0
    for n, item in enumerate(items):
        total += weigh(item)
        if total > max_weight and n > 0:
            return n
    return len(items)
