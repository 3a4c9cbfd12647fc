"""Several beanstalkd servers used as one queue: beanstalkd has no clustering of its own.

The producer's server for a mail is chosen from the mail id (a stable hash), so a retried put
of the same mail goes to the same server; when that server cannot be reached, the next one
takes the mail (its document is already stored, so nothing is lost either way). Consumers
reserve from every server with connections of their own (see :mod:`mailer.consumer`).

Job ids are per server, so wherever mailer keeps or compares a job id (the producer's job
receipts, a mail's ``job_id``, the consumer's jobs in flight, attempts) it uses a *fleet job
id*: the server's place in ``beanstalkd.servers`` in the bits above :data:`SERVER_SHIFT`, the
server's own id below. The first (or only) server's ids are stored unchanged, so every id
written before there were several servers still names its job; and a fleet id stays an
``int``, as compact as before. Round robin by job id stays exact per server: the server's
bits add the same offset to each of its consecutive ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from mailer.beanstalk import DEFAULT_PRIORITY, Beanstalk, Job
from mailer.config import BeanstalkdSettings
from mailer.errors import (
    BeanstalkConnectionError,
    BeanstalkError,
    BeanstalkServerError,
    BeanstalkTimeoutError,
    NotFound,
)
from mailer.lifecycle import AsyncResource

log = logging.getLogger("mailer.fleet")
SERVER_SHIFT = 48  # 2.8e14 jobs per server before an id reaches the server bits
_LOCAL_MASK = (1 << SERVER_SHIFT) - 1
# A server that failed is tried last for this long, so that puts do not each pay its
# connect timeout (a blackholed host costs connect_timeout_s per attempt).
DOWN_S = 5.0
_TRANSPORT = (BeanstalkConnectionError, BeanstalkTimeoutError)
_T = TypeVar("_T")
PutResult = int | BeanstalkServerError


def fleet_job_id(server: int, job_id: int) -> int:
    """The id mailer stores for job ``job_id`` of server number ``server``."""
    return job_id if server == 0 else (server << SERVER_SHIFT) | job_id


def split_job_id(value: int) -> tuple[int, int]:
    """(server number, that server's job id) of a stored job id; a plain id is server 0's."""
    return value >> SERVER_SHIFT, value & _LOCAL_MASK


def server_of(mail_id: str, n: int) -> int:
    """The server a mail goes to first. An ObjectId's last 6 hex digits are a counter, so a
    producer's consecutive mails alternate exactly; anything else is hashed."""
    if n == 1:
        return 0
    try:
        return int(mail_id[-6:], 16) % n
    except ValueError:
        return zlib.crc32(mail_id.encode()) % n


def _new(address: tuple[str, int], b: BeanstalkdSettings) -> Beanstalk:
    return Beanstalk(
        address[0], address[1], connect_timeout=b.connect_timeout_s, command_timeout=b.command_timeout_s
    )


def connections(b: BeanstalkdSettings) -> list[Beanstalk]:
    """One (unconnected) client per configured server, in the configured order."""
    return [_new(address, b) for address in b.addresses()]


class Fleet(AsyncResource):
    """Puts, peeks and statistics over every configured server; safe to share between tasks.

    >>> async with Fleet.from_settings(settings.beanstalkd) as fleet:
    ...     await fleet.use("mails")
    ...     job_id = await fleet.put(mail_id)
    """

    def __init__(self, servers: Sequence[Beanstalk], *, clock: Callable[[], float] = time.monotonic) -> None:
        if not servers:
            raise ValueError("a fleet needs at least one beanstalkd server")
        self.servers = list(servers)
        self.clock = clock
        self._tube: str | None = None
        self._locks = [asyncio.Lock() for _ in self.servers]
        self._down_until = [0.0] * len(self.servers)

    @classmethod
    def from_settings(cls, b: BeanstalkdSettings, *, clock: Callable[[], float] = time.monotonic) -> Fleet:
        return cls(connections(b), clock=clock)

    def __repr__(self) -> str:
        names = ", ".join(self.name(i) for i in range(len(self.servers)))
        return f"<Fleet {names} using={self._tube!r}>"

    def __len__(self) -> int:
        return len(self.servers)

    def name(self, server: int) -> str:
        q = self.servers[server]
        return f"{q.host}:{q.port}"

    @property
    def connected(self) -> bool:
        return any(q.connected for q in self.servers)

    # --- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to every server. With one server its error is raised, as a single client
        would; with several, those that cannot be reached are tried again when needed, and
        only when none can be reached is the first error raised."""
        errors = await asyncio.gather(*(self._open(i) for i in range(len(self.servers))))
        failed = [e for e in errors if e is not None]
        if len(failed) == len(self.servers):
            raise failed[0]
        for i, error in enumerate(errors):
            if error is not None:
                log.warning("beanstalkd %s unavailable (%s); using the others", self.name(i), error)

    async def _open(self, server: int) -> BeanstalkError | None:
        queue = self.servers[server]
        try:
            await queue.connect()
            if self._tube is not None:
                await queue.use(self._tube)
        except _TRANSPORT as exc:
            await queue.close()
            self._down_until[server] = self.clock() + DOWN_S
            return exc
        return None

    async def use(self, tube: str) -> None:
        """Put on ``tube`` from now on, on every server (one not reachable now uses it once
        it is reconnected)."""
        self._tube = tube
        for queue in self.servers:
            if queue.connected:
                await queue.use(tube)

    async def close(self) -> None:
        for queue in self.servers:
            await queue.close()

    async def revive(self, server: int) -> None:
        """Reconnect one server once for every task that saw the same broken connection."""
        async with self._locks[server]:
            queue = self.servers[server]
            if queue.connected:
                return
            log.debug("connecting to beanstalkd %s", self.name(server))
            await queue.close()
            error = await self._open(server)
            if error is not None:
                raise error

    def order(self, first: int) -> list[int]:
        """The servers to try for a mail whose own server is ``first``: it, then the next
        ones; those that failed lately last (still tried when everything else fails)."""
        n = len(self.servers)
        ring = [(first + k) % n for k in range(n)]
        if n == 1:
            return ring
        now = self.clock()
        return sorted(ring, key=lambda i: self._down_until[i] > now)

    # --- puts ----------------------------------------------------------------------------

    async def put(
        self, mail_id: str, *, priority: int = DEFAULT_PRIORITY, delay: int = 0, ttr: int = 120
    ) -> int:
        """Put one mail's id; its fleet job id. Raises the last server's error when no server
        took it."""
        body = mail_id.encode()
        server, job = await self._on_some_server(
            server_of(mail_id, len(self.servers)),
            lambda queue: queue.put(body, priority=priority, delay=delay, ttr=ttr),
        )
        return fleet_job_id(server, job)

    async def put_many(
        self, mail_ids: Sequence[str], *, priority: int = DEFAULT_PRIORITY, delay: int = 0, ttr: int = 120
    ) -> list[PutResult]:
        """Put many mails' ids, pipelined per server; per mail its fleet job id or the
        server's error for it. Raises when some mail could be put on no server."""
        n = len(self.servers)
        if n == 1:
            return await self._put_group(0, list(mail_ids), priority, delay, ttr)
        groups: dict[int, list[int]] = {}
        for i, mail_id in enumerate(mail_ids):
            groups.setdefault(server_of(mail_id, n), []).append(i)
        answers = await asyncio.gather(
            *(
                self._put_group(server, [mail_ids[i] for i in indexes], priority, delay, ttr)
                for server, indexes in groups.items()
            )
        )
        results: list[PutResult] = [0] * len(mail_ids)
        for indexes, answer in zip(groups.values(), answers, strict=True):
            for i, result in zip(indexes, answer, strict=True):
                results[i] = result
        return results

    async def _put_group(
        self, first: int, mail_ids: list[str], priority: int, delay: int, ttr: int
    ) -> list[PutResult]:
        bodies = [m.encode() for m in mail_ids]
        server, puts = await self._on_some_server(
            first, lambda queue: queue.put_many(bodies, priority=priority, delay=delay, ttr=ttr)
        )
        if server == 0:
            return puts  # server 0's job ids are the fleet's as they are
        return [p if isinstance(p, BeanstalkServerError) else fleet_job_id(server, p) for p in puts]

    async def _on_some_server(
        self, first: int, attempt: Callable[[Beanstalk], Awaitable[_T]]
    ) -> tuple[int, _T]:
        """``attempt`` on ``first``, reconnected once, then on each next server in turn; the
        server that answered and its answer, or the last server's error when none did.

        Retrying after a dropped connection may queue a mail twice (some puts may have gone
        through before it dropped); that is harmless: the consumer's claim lets one job deliver.
        """
        error: BeanstalkError | None = None
        for server in self.order(first):
            queue = self.servers[server]
            try:
                try:
                    return server, await attempt(queue)
                except _TRANSPORT:
                    await self.revive(server)
                    return server, await attempt(queue)
            except _TRANSPORT as exc:
                error = self._failed(server, exc)
        assert error is not None
        raise error

    def _failed(self, server: int, exc: BeanstalkError) -> BeanstalkError:
        self._down_until[server] = self.clock() + DOWN_S
        if len(self.servers) > 1:
            log.warning("beanstalkd %s failed (%s); putting on the next server", self.name(server), exc)
        return exc

    # --- inspection ----------------------------------------------------------------------

    async def reachable(self) -> list[int]:
        """The servers that answer now (reconnecting those that do not, once each)."""
        out: list[int] = []
        for server, queue in enumerate(self.servers):
            if not queue.connected:
                with contextlib.suppress(BeanstalkError):
                    await self.revive(server)
            if queue.connected:
                out.append(server)
        return out

    async def _answering(self) -> list[int]:
        """As :meth:`reachable`, but raise when no server answers."""
        live = await self.reachable()
        if not live:
            raise BeanstalkConnectionError(
                f"cannot reach any beanstalkd server ({', '.join(map(self.name, range(len(self))))}); "
                "is it running? ('make services' starts the local one)"
            )
        return live

    async def peek_all(self, job_ids: Sequence[int]) -> list[Job | None]:
        """Per fleet job id, its job in any state, or None: deleted, or on a server that cannot
        be reached (which counts as having lost its jobs: see :mod:`mailer.requeue`). Raises
        when no server can be reached. The peeks are pipelined, one connection per server."""
        live = set(await self._answering())
        by_server: dict[int, list[int]] = {}
        for i, value in enumerate(job_ids):
            by_server.setdefault(split_job_id(value)[0], []).append(i)
        found: list[Job | None] = [None] * len(job_ids)
        for server, indexes in by_server.items():
            if server not in live:
                continue
            queue = self.servers[server]
            try:
                jobs = await asyncio.gather(*(queue.peek(split_job_id(job_ids[i])[1]) for i in indexes))
            except _TRANSPORT as exc:
                log.warning("beanstalkd %s failed during the peeks (%s)", self.name(server), exc)
                continue
            for i, job in zip(indexes, jobs, strict=True):
                found[i] = job
        return found

    async def stats_tube(self, tube: str) -> dict[str, str | int | float]:
        """``stats-tube`` summed over the servers that know the tube (counts add up; text
        fields are the first server's); NotFound when none does."""
        total: dict[str, str | int | float] = {}
        for server in await self._answering():
            try:
                stats = await self.servers[server].stats_tube(tube)
            except NotFound:
                continue
            for key, value in stats.items():
                held = total.get(key)
                if isinstance(value, int) and isinstance(held, int):
                    total[key] = held + value
                elif held is None:
                    total[key] = value
        if not total:
            raise NotFound(f"stats-tube {tube}", "")
        return total

    async def kick(self, bound: int) -> int:
        """Kick up to ``bound`` jobs of the used tube on every reachable server."""
        kicked = 0
        for server in await self._answering():
            kicked += await self.servers[server].kick(bound)
        return kicked


__all__ = ["SERVER_SHIFT", "Fleet", "connections", "fleet_job_id", "server_of", "split_job_id"]
