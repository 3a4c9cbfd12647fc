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

    ``write`` gets at most ``max_batch`` items and returns one result per item, in order;
    if it raises, every caller of that batch gets a copy made by ``on_error``.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 200,
        on_error: Callable[[BaseException], BaseException] = lambda exc: exc,
    ) -> None:
        self._write = write
        self.max_batch = max_batch
        self._on_error = on_error
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if not self.busy:
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            try:
                results = await self._write([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(self._on_error(exc))
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def close(self, within: float | None = None) -> None:
        """Wait (at most ``within`` seconds) for the writes already accepted."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=within)
