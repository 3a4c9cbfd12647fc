"""The one shape of every long-lived resource: ``connect()``/``close()`` and ``async with``."""

from __future__ import annotations

from types import TracebackType
from typing import Self


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
