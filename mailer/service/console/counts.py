"""The mail counts per status that head the console's list, shared by every page view.

They are a ``$group`` over every stored mail: 28 ms at 100,000 mails on nx-27017, growing with
the collection on MongoDB too (no index answers a count per status there in one pass). The
list itself is served by indexes; recounting on every view, and on every 2-second live
refresh of every open console, would make the counts the page's main cost. So one count
serves all views for ``ttl_s`` (the live refresh's period: a count is at most one refresh
old), concurrent views wait for the same count, and the console's own actions (cancel,
retry, kick) drop it so their effect shows at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["COUNTS_TTL_S", "SharedCounts"]

COUNTS_TTL_S = 2.0
Counts = dict[str, int]


class SharedCounts:
    def __init__(
        self, *, ttl_s: float = COUNTS_TTL_S, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self._monotonic = monotonic
        self._value: Counts | None = None
        self._at = 0.0
        self._counting: asyncio.Future[Counts] | None = None
        self._generation = 0  # bumped by drop(): a count begun before it is not kept

    async def get(self, count: Callable[[], Awaitable[Counts]]) -> Counts:
        if self._value is not None and self._monotonic() - self._at < self.ttl_s:
            return dict(self._value)
        if self._counting is None or self._counting.done():
            self._counting = asyncio.ensure_future(self._count(count, self._generation))
        return dict(await asyncio.shield(self._counting))

    async def _count(self, count: Callable[[], Awaitable[Counts]], generation: int) -> Counts:
        started = self._monotonic()
        value = await count()
        if generation == self._generation:
            self._value, self._at = value, started
        return value

    def drop(self) -> None:
        """Forget the count (an action changed a mail's status)."""
        self._value = None
        self._counting = None
        self._generation += 1
