"""Noticing that this process itself stood still (SIGSTOP, a VM pause, a swap storm).

A process that was frozen wakes with every timer due at once: each pending vendor read
"times out" although the vendor answered long ago. Those timeouts say nothing about the
vendors, so delivery must not mark a vendor unavailable for every consumer on their
strength, and must check that its claims still stand before it sends again (another
consumer may have taken them over meanwhile).

A ticker task wakes every ``tick_s``; a gap between two ticks longer than ``threshold_s``
is a stall. Because a woken process may run the vendor's timeout callback *before* the
ticker's, :meth:`StallWatch.stalled_between` also treats "the ticker is overdue right now"
as a stall in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("mailer.stalls")


class StallWatch:
    """Remembers recent stalls of the event loop; ``start()`` in a running loop, ``close()``."""

    def __init__(
        self,
        *,
        tick_s: float = 0.25,
        threshold_s: float = 2.0,
        keep: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tick_s = tick_s
        self.threshold_s = threshold_s
        self.clock = clock
        self.last_tick = clock()
        self.stalls: deque[tuple[float, float]] = deque(maxlen=keep)  # (start, end), monotonic
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self.last_tick = self.clock()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self.tick()

    def tick(self) -> None:
        """Note that the loop ran now; a long gap since the last tick was a stall."""
        now = self.clock()
        if now - self.last_tick > self.threshold_s:
            self.stalls.append((self.last_tick, now))
            log.warning(
                "this process stood still for %.1f s (stopped, paused or starved of CPU): "
                "timeouts in that time are not held against the vendors",
                now - self.last_tick,
            )
        self.last_tick = now

    def stalled_between(self, start: float, end: float | None = None) -> float:
        """Seconds this process stood still between ``start`` and ``end`` (monotonic; end
        defaults to now), counting a stall still in progress (the ticker is overdue)."""
        now = self.clock()
        end = now if end is None else end
        total = sum(min(e, end) - max(s, start) for s, e in self.stalls if e > start and s < end)
        if self._task is not None and now - self.last_tick > self.threshold_s and end > self.last_tick:
            total += min(now, end) - max(self.last_tick, start)
        return max(0.0, total)
