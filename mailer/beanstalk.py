"""An asyncio beanstalkd client with pipelining.

beanstalkd answers the commands of one connection strictly in order, so the client writes
each command at once and queues a future for its reply; one reader task resolves the
futures in order. Many tasks can therefore share one connection (replies are never matched
to the wrong caller) and keep many commands in flight: this is what makes puts fast
(pipelined puts on one connection run an order of magnitude faster than sequential ones).

A ``reserve`` blocks its connection until a job arrives, so the consumer gives each
reserve loop a connection of its own.

Any transport failure, or a reply that does not come within ``command_timeout``, closes the
connection and fails every pending call with :class:`BeanstalkConnectionError` or
:class:`BeanstalkTimeoutError`; callers reconnect with :meth:`Beanstalk.reconnect`, which
also restores the ``use``/``watch`` state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

from mailer.errors import (
    SERVER_ERRORS,
    BeanstalkConnectionError,
    BeanstalkProtocolError,
    BeanstalkServerError,
    BeanstalkTimeoutError,
    TimedOut,
)
from mailer.lifecycle import AsyncResource

DEFAULT_PRIORITY = 1024
_BODY_REPLIES = frozenset({b"RESERVED", b"FOUND", b"OK"})
_Reply = tuple[list[bytes], bytes | None]


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    body: bytes


class _Pending:
    """A reply slot. Cancelled slots are still read (to keep the order), then dropped."""

    __slots__ = ("command", "deadline", "future")

    def __init__(self, command: str, future: asyncio.Future[_Reply], deadline: float) -> None:
        self.command = command
        self.future = future
        self.deadline = deadline


class Beanstalk(AsyncResource):
    """One beanstalkd connection, safe to share between tasks.

    >>> async with Beanstalk("127.0.0.1", 11300) as bs:
    ...     await bs.use("mails")
    ...     job_id = await bs.put(b"hello")
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 11300,
        *,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._pending: collections.deque[_Pending] = collections.deque()
        self._using = "default"
        self._watching: list[str] = ["default"]
        self._closed_error: BaseException | None = None
        # One timer watches the oldest pending reply (replies come in order, so if the
        # oldest is late the connection is stuck); cheaper than a timeout per call.
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        state = "connected" if self.connected else "closed"
        return f"<Beanstalk {self.host}:{self.port} {state} using={self._using!r}>"

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._closed_error is None

    async def connect(self) -> None:
        if self.connected:
            return
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise BeanstalkConnectionError(
                f"cannot connect to beanstalkd at {self.host}:{self.port}: {exc or 'timed out'}; "
                "is it running? ('make services' starts the local one)"
            ) from None
        self._closed_error = None
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def reconnect(self) -> None:
        """Open a fresh connection and restore the tube state of the old one."""
        await self.close()
        await self.connect()
        if self._using != "default":
            await self.use(self._using)
        watching = list(self._watching)
        for tube in watching:
            if tube != "default":
                await self.watch(tube)
        if "default" not in watching:
            await self.ignore("default")
        self._watching = watching

    async def close(self) -> None:
        """Close the connection; pending calls fail. Jobs reserved here go back to ready."""
        self._fail_all(BeanstalkConnectionError("connection closed by the client"))
        writer, self._writer = self._writer, None
        task, self._read_task = self._read_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # --- the pipeline ------------------------------------------------------------------

    def _fail_all(self, error: BaseException) -> None:
        if self._closed_error is None:
            self._closed_error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            slot = self._pending.popleft()
            if not slot.future.done():
                slot.future.set_exception(error)
                # Retrieved or not, do not warn "exception was never retrieved".
                slot.future.exception()

    async def _read_loop(self) -> None:
        reader, writer = self._reader, self._writer
        assert reader is not None
        try:
            while True:
                line = await reader.readuntil(b"\r\n")
                tokens = line[:-2].split(b" ")
                body: bytes | None = None
                if tokens[0] in _BODY_REPLIES:
                    size = int(tokens[-1])
                    body = (await reader.readexactly(size + 2))[:-2]
                if self._reader is not reader:
                    # A reply still buffered from a connection that was closed and replaced:
                    # it belongs to nobody waiting now.
                    return
                if not self._pending:
                    raise BeanstalkProtocolError(f"unexpected reply from beanstalkd: {line[:80]!r}")
                slot = self._pending.popleft()
                if not slot.future.done():
                    slot.future.set_result((tokens, body))
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            if self._reader is reader:  # not a replaced connection: fail its callers
                self._fail_all(
                    BeanstalkConnectionError(
                        f"lost the connection to beanstalkd at {self.host}:{self.port} "
                        f"({type(exc).__name__}); reconnect and retry"
                    )
                )
        except (ValueError, IndexError, BeanstalkProtocolError) as exc:
            if self._reader is reader:
                self._fail_all(BeanstalkProtocolError(f"unreadable reply from beanstalkd: {exc}"))
        finally:
            # Only this loop's own connection: a new one may already be in place.
            if writer is not None:
                writer.close()

    def _live_writer(self) -> asyncio.StreamWriter:
        if self._writer is None or self._closed_error is not None:
            raise BeanstalkConnectionError(
                f"not connected to beanstalkd at {self.host}:{self.port}"
                + (f" ({self._closed_error})" if self._closed_error else "")
                + "; call connect() or reconnect()"
            )
        return self._writer

    def _enqueue(self, command: str, extra: float = 0.0) -> asyncio.Future[_Reply]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Reply] = loop.create_future()
        deadline = loop.time() + self.command_timeout + extra
        self._pending.append(_Pending(command, future, deadline))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._check_deadline)
        return future

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._pending:
            return
        head = self._pending[0]
        loop = asyncio.get_running_loop()
        if head.deadline > loop.time():
            self._timer = loop.call_at(head.deadline, self._check_deadline)
            return
        self._fail_all(
            BeanstalkTimeoutError(
                f"beanstalkd at {self.host}:{self.port} did not answer {head.command!r} in time; "
                "the connection was closed, reconnect and retry"
            )
        )
        if self._writer is not None:
            self._writer.close()

    def _send(self, command: str, data: bytes, extra: float = 0.0) -> asyncio.Future[_Reply]:
        """Write one command and queue its reply slot, with no await in between (order!)."""
        self._live_writer().write(data)
        return self._enqueue(command, extra)

    async def _wait(self, command: str, future: asyncio.Future[_Reply]) -> _Reply:
        try:
            writer = self._writer
            if writer is not None and writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()
            return await future
        except asyncio.CancelledError:
            # A cancelled slot's reply is still read and dropped, so order holds. But a
            # cancelled reserve would leave a job reserved here: drop the connection
            # instead (beanstalkd then releases the job) rather than keep an unknown state.
            if command.startswith("reserve"):
                self._fail_all(BeanstalkConnectionError("a reserve was cancelled"))
                if self._writer is not None:
                    self._writer.close()
            raise
        except ConnectionError as exc:
            raise BeanstalkConnectionError(f"lost the connection to beanstalkd: {exc}") from None

    async def _call(self, command: str, body: bytes | None = None, *, extra: float = 0.0) -> _Reply:
        data = command.encode("ascii") + b"\r\n"
        if body is not None:
            data += body + b"\r\n"
        return await self._wait(command, self._send(command, data, extra))

    @staticmethod
    def _check(command: str, reply: _Reply, *expected: bytes) -> list[bytes]:
        tokens = reply[0]
        if tokens[0] in expected:
            return tokens
        name = tokens[0].decode("ascii", "replace")
        error = SERVER_ERRORS.get(name)
        if error is None:
            raise BeanstalkProtocolError(f"unexpected reply {name!r} to {command!r}")
        raise error(command, " ".join(t.decode("ascii", "replace") for t in tokens[1:]))

    # --- producer commands -------------------------------------------------------------

    async def use(self, tube: str) -> None:
        command = f"use {tube}"
        self._check(command, await self._call(command), b"USING")
        self._using = tube

    @staticmethod
    def _put_data(body: bytes, priority: int, delay: int, ttr: int) -> tuple[str, bytes]:
        command = f"put {priority} {delay} {ttr} {len(body)}"
        return command, command.encode("ascii") + b"\r\n" + body + b"\r\n"

    async def put(
        self, body: bytes, *, priority: int = DEFAULT_PRIORITY, delay: int = 0, ttr: int = 120
    ) -> int:
        """Put a job on the used tube and return its id."""
        command, data = self._put_data(body, priority, delay, ttr)
        tokens = self._check(command, await self._wait(command, self._send(command, data)), b"INSERTED")
        return int(tokens[1])

    async def put_many(
        self, bodies: Iterable[bytes], *, priority: int = DEFAULT_PRIORITY, delay: int = 0, ttr: int = 120
    ) -> list[int | BeanstalkServerError]:
        """Put many jobs in one write; per job, its id or the server's error for it."""
        futures: list[tuple[str, asyncio.Future[_Reply]]] = []
        chunks: list[bytes] = []
        commands: list[str] = []
        for body in bodies:
            command, data = self._put_data(body, priority, delay, ttr)
            chunks.append(data)
            commands.append(command)
        if not chunks:
            return []
        # One write, then one slot per command, all before any await: order is preserved.
        self._live_writer().write(b"".join(chunks))
        for command in commands:
            futures.append((command, self._enqueue(command)))
        results: list[int | BeanstalkServerError] = []
        for command, future in futures:
            try:
                tokens = self._check(command, await self._wait(command, future), b"INSERTED")
                results.append(int(tokens[1]))
            except BeanstalkServerError as exc:
                results.append(exc)
        return results

    # --- consumer commands -------------------------------------------------------------

    async def watch(self, tube: str) -> int:
        command = f"watch {tube}"
        tokens = self._check(command, await self._call(command), b"WATCHING")
        if tube not in self._watching:
            self._watching.append(tube)
        return int(tokens[1])

    async def ignore(self, tube: str) -> int:
        command = f"ignore {tube}"
        tokens = self._check(command, await self._call(command), b"WATCHING")
        if tube in self._watching:
            self._watching.remove(tube)
        return int(tokens[1])

    async def reserve(self, timeout: float | None = None) -> Job:  # noqa: ASYNC109
        """Reserve a job; with ``timeout`` (seconds) raise :class:`TimedOut` when none comes."""
        if timeout is None:
            command, extra = "reserve", 10.0**9
        else:
            command, extra = f"reserve-with-timeout {max(0, math.ceil(timeout))}", max(0.0, timeout)
        reply = await self._call(command, extra=extra)
        tokens = self._check(command, reply, b"RESERVED")
        assert reply[1] is not None
        return Job(int(tokens[1]), reply[1])

    async def delete(self, job_id: int) -> None:
        command = f"delete {job_id}"
        self._check(command, await self._call(command), b"DELETED")

    async def release(self, job_id: int, *, priority: int = DEFAULT_PRIORITY, delay: int = 0) -> None:
        command = f"release {job_id} {priority} {delay}"
        self._check(command, await self._call(command), b"RELEASED")

    async def bury(self, job_id: int, *, priority: int = DEFAULT_PRIORITY) -> None:
        command = f"bury {job_id} {priority}"
        self._check(command, await self._call(command), b"BURIED")

    async def touch(self, job_id: int) -> None:
        command = f"touch {job_id}"
        self._check(command, await self._call(command), b"TOUCHED")

    # --- inspection and operations -----------------------------------------------------

    async def _peek(self, command: str) -> Job | None:
        reply = await self._call(command)
        if reply[0][0] == b"NOT_FOUND":
            return None
        tokens = self._check(command, reply, b"FOUND")
        assert reply[1] is not None
        return Job(int(tokens[1]), reply[1])

    async def peek(self, job_id: int) -> Job | None:
        return await self._peek(f"peek {job_id}")

    async def peek_ready(self) -> Job | None:
        return await self._peek("peek-ready")

    async def peek_delayed(self) -> Job | None:
        return await self._peek("peek-delayed")

    async def peek_buried(self) -> Job | None:
        return await self._peek("peek-buried")

    async def kick(self, bound: int) -> int:
        """Move up to ``bound`` buried (or else delayed) jobs of the used tube to ready."""
        command = f"kick {bound}"
        return int(self._check(command, await self._call(command), b"KICKED")[1])

    async def kick_job(self, job_id: int) -> None:
        command = f"kick-job {job_id}"
        self._check(command, await self._call(command), b"KICKED")

    async def _yaml(self, command: str) -> bytes:
        reply = await self._call(command)
        self._check(command, reply, b"OK")
        assert reply[1] is not None
        return reply[1]

    async def stats(self) -> dict[str, str | int | float]:
        return _parse_dict(await self._yaml("stats"))

    async def stats_tube(self, tube: str) -> dict[str, str | int | float]:
        return _parse_dict(await self._yaml(f"stats-tube {tube}"))

    async def stats_job(self, job_id: int) -> dict[str, str | int | float]:
        return _parse_dict(await self._yaml(f"stats-job {job_id}"))

    async def list_tubes(self) -> list[str]:
        return _parse_list(await self._yaml("list-tubes"))

    async def list_tube_used(self) -> str:
        command = "list-tube-used"
        return self._check(command, await self._call(command), b"USING")[1].decode()

    async def list_tubes_watched(self) -> list[str]:
        return _parse_list(await self._yaml("list-tubes-watched"))


def _scalar(text: str) -> str | int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text.strip('"')


def _parse_dict(body: bytes) -> dict[str, str | int | float]:
    """beanstalkd's stats are a flat YAML mapping; no YAML library is needed for that."""
    out: dict[str, str | int | float] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key.strip()] = _scalar(value.strip())
    return out


def _parse_list(body: bytes) -> list[str]:
    return [
        line[2:].strip() for line in body.decode("utf-8", "replace").splitlines() if line.startswith("- ")
    ]


__all__ = ["DEFAULT_PRIORITY", "Beanstalk", "Job", "TimedOut"]
