"""A sending process's copy of the suppression list, so a write need not query the list.

The check at send time (``[suppression] mode``) asked MongoDB for every write: a lone
``send`` paid one more round trip than its insert, and on nx-27017 as much CPU again
(client and server). Instead each producer keeps the list's addresses and its generation
(a counter every change bumps, :meth:`MailStore.suppression_generation`), and reads the
generation every third of ``[suppression] lease_s``; on a change it reads the list again.
The copy is trusted for ``lease_s`` from the start of the read that found it current.

Why that is exact, not merely fresh: a change to the list (``MailStore.add_suppression``
and friends) is acknowledged only ``lease_s`` (and a little) after it was written and the
generation bumped. A view trusted at that moment began its read after the write, so it
has the change. A send that starts after an add was acknowledged (the API answered, the
CLI returned) is therefore checked against a list that has it. A send racing with a
change may see it or not, as with a query. A view that cannot read MongoDB stops being
trusted when its lease ends, and the check queries again (and fails as a query would).

Writers wait out the longest lease any view announced (each view announces its own before
it first trusts a copy, and every ``LEASE_ANNOUNCE_EVERY_S`` after), so processes need not
agree on ``lease_s``.

Lists above ``max_entries`` addresses are not copied (the process would hold them all);
such a process queries per write, as with ``lease_s = 0``.

A view nobody has asked for ``idle_after_s`` stops reading until the next send, which then
queries once (as an untrusted view always does) and wakes it: a read after an idle moment
costs about 1.5 ms of CPU, so an idle process used 12 ms of CPU a second on reads nobody
needed (50 idle web workers with a producer each: 60% of a core).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from typing import Protocol

from pymongo.errors import PyMongoError

from mailer.lifecycle import stop_tasks
from mailer.store import LEASE_ANNOUNCE_EVERY_S

__all__ = ["MAX_ENTRIES", "SuppressionView"]

log = logging.getLogger("mailer.suppression")
MAX_ENTRIES = 200_000  # about 20 MB of addresses in a process
IDLE_AFTER_S = 5.0  # no send asked the view for this long: it stops reading until one does


class _ListStore(Protocol):
    async def suppressed_among(self, addresses: Collection[str]) -> set[str]: ...

    async def suppression_generation(self) -> int: ...

    async def all_suppressions(self, limit: int) -> list[str]: ...

    async def announce_suppression_lease(self, lease_s: float) -> None: ...


class SuppressionView:
    """The list as this process sees it; ``suppressed_among`` as the store's, from memory
    while the view is trusted and by a query otherwise."""

    def __init__(
        self,
        store: _ListStore,
        *,
        lease_s: float,
        max_entries: int = MAX_ENTRIES,
        idle_after_s: float = IDLE_AFTER_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.lease_s = lease_s
        self.max_entries = max_entries
        self.idle_after_s = idle_after_s
        self._monotonic = monotonic
        self._asked_at = monotonic()
        self._wake: asyncio.Event | None = None  # set while the reads are paused
        self._addresses: frozenset[str] = frozenset()
        self._generation: int | None = None
        self._trusted_until = float("-inf")
        self._announce_due = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self.too_large = False

    def __repr__(self) -> str:
        return f"<SuppressionView {len(self._addresses)} address(es) trusted={self.trusted}>"

    @property
    def trusted(self) -> bool:
        return self._monotonic() < self._trusted_until

    @property
    def paused(self) -> bool:
        """Whether the background reads wait for the next send (the view went idle)."""
        return self._wake is not None

    async def suppressed_among(self, addresses: Collection[str]) -> set[str]:
        now = self._asked_at = self._monotonic()
        if now < self._trusted_until:
            return set(self._addresses.intersection(addresses))
        if self._wake is not None:
            self._wake.set()  # an idle view: read again from now on
        return await self._store.suppressed_among(addresses)

    def start(self) -> None:
        """Keep the view current in the background (nothing to do with ``lease_s = 0``)."""
        self._asked_at = self._monotonic()  # a fresh producer is about to send, most likely
        if self.lease_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_current(), name="suppression-view")

    async def close(self) -> None:
        task, self._task = self._task, None
        self._trusted_until = float("-inf")
        if task is None:
            return
        await stop_tasks([task], within=self.lease_s + 5)

    async def refresh(self) -> None:
        """One read: the generation, and the list again if it changed. The view is then
        trusted for ``lease_s`` from when this read began."""
        began = self._monotonic()
        if began >= self._announce_due:  # before the first trust, and again now and then
            await self._store.announce_suppression_lease(self.lease_s)
            self._announce_due = began + LEASE_ANNOUNCE_EVERY_S
        generation = await self._store.suppression_generation()
        if generation != self._generation:
            found = await self._store.all_suppressions(self.max_entries + 1)
            if len(found) > self.max_entries:
                self.too_large, self._addresses, self._trusted_until = True, frozenset(), float("-inf")
                return
            self._addresses, self._generation = frozenset(found), generation
        self._trusted_until = began + self.lease_s

    async def _keep_current(self) -> None:
        period = self.lease_s / 3  # two reads may fail before the view stops being trusted
        while True:
            try:
                await self.refresh()
            except PyMongoError as exc:
                log.debug("could not read the suppression list (%s); checking by query", type(exc).__name__)
            if self.too_large:
                log.info(
                    "the suppression list has more than %d addresses: this process checks it by query",
                    self.max_entries,
                )
                return
            await asyncio.sleep(period)
            if self._monotonic() - self._asked_at >= self.idle_after_s:
                await self._until_asked()

    async def _until_asked(self) -> None:
        """Pause the reads until a send asks (its lease then lapses: sends query meanwhile)."""
        self._wake = asyncio.Event()
        try:
            await self._wake.wait()
        finally:
            self._wake = None
