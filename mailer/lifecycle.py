"""The one shape of every long-lived resource: ``connect()``/``close()`` and ``async with``,
and the one way a resource stops the background tasks it owns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Self

__all__ = ["AsyncResource", "stop_tasks"]

log = logging.getLogger(__name__)

# Between cancels of a task that went on: long enough for any cleanup a cancel starts.
_RECANCEL_S = 0.1


class AsyncResource:
    """Mixin: ``async with X(...) as x`` connects on entry and closes on exit.

    Subclasses define ``connect`` (idempotent) and ``close`` (safe to call twice).
    """

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, within: float = 5.0) -> None:
    """Cancel background tasks and wait for them to end, cancelling again any that go on.

    One cancel is not always enough: Python 3.11's ``asyncio.wait_for``, which pymongo wraps
    around its socket reads and writes, drops a cancel that lands as the read completes, and
    the task goes on to its next operation as if never cancelled (19 of 300 cancels of a loop
    of finds on this machine). A loop that is only ever cancelled, awaited without a bound,
    then holds its owner's ``close()`` forever. A task still running after ``within`` seconds
    is left behind with a warning rather than hanging the shutdown (``math.inf``: wait for
    every one). A task's own error is logged, not raised: it is over, and the others must
    still be stopped.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            log.warning("%d background task(s) still running after %.1f s: left behind", len(pending), within)
            break
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_S, left))
    for task in tasks:
        if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s ended with an error", task.get_name(), exc_info=exc)
