"""The asyncio beanstalkd client against the real server (and a few fake ones for failures)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from helpers import OwnBeanstalkd, free_port

from mailer.beanstalk import Beanstalk, Job, _parse_dict, _parse_list
from mailer.config import Settings
from mailer.errors import (
    BeanstalkConnectionError,
    BeanstalkProtocolError,
    BeanstalkServerError,
    BeanstalkTimeoutError,
    JobTooBig,
    NotFound,
    NotIgnored,
    TimedOut,
    UnknownCommand,
)

MakeSettings = Callable[..., Awaitable[Settings]]


@pytest.fixture
async def tube_settings(make_settings: MakeSettings) -> Settings:
    return await make_settings()


@pytest.fixture
async def bs(tube_settings: Settings) -> AsyncIterator[Beanstalk]:
    """A connection that uses and watches only the test's own tube."""
    b = tube_settings.beanstalkd
    client = Beanstalk(b.host, b.port, command_timeout=5.0)
    await client.connect()
    await client.use(b.tube)
    await client.watch(b.tube)
    await client.ignore("default")
    yield client
    await client.close()


def tube_of(bs: Beanstalk) -> str:
    return bs._using


# --- basic commands --------------------------------------------------------------------


async def test_put_reserve_delete(bs: Beanstalk) -> None:
    job_id = await bs.put(b"hello \xff\x00 world", priority=7, ttr=30)
    assert isinstance(job_id, int) and job_id > 0
    job = await bs.reserve(timeout=2)
    assert job == Job(job_id, b"hello \xff\x00 world")
    stats = await bs.stats_job(job_id)
    assert stats["state"] == "reserved"
    assert stats["pri"] == 7 and stats["ttr"] == 30
    assert stats["tube"] == tube_of(bs)
    await bs.delete(job_id)
    assert await bs.peek(job_id) is None
    with pytest.raises(NotFound):
        await bs.delete(job_id)


async def test_body_with_crlf_and_empty_body(bs: Beanstalk) -> None:
    a = await bs.put(b"line1\r\nline2\r\n")
    b = await bs.put(b"")
    assert (await bs.reserve(timeout=1)).body == b"line1\r\nline2\r\n"
    assert await bs.reserve(timeout=1) == Job(b, b"")
    await bs.delete(a)
    await bs.delete(b)


async def test_priority_orders_reserves(bs: Beanstalk) -> None:
    low = await bs.put(b"low", priority=2000)
    high = await bs.put(b"high", priority=1)
    assert (await bs.reserve(timeout=1)).id == high
    assert (await bs.reserve(timeout=1)).id == low


async def test_release_with_delay(bs: Beanstalk) -> None:
    job_id = await bs.put(b"again")
    job = await bs.reserve(timeout=1)
    await bs.release(job.id, priority=5, delay=30)
    stats = await bs.stats_job(job_id)
    assert stats["state"] == "delayed"
    assert stats["delay"] == 30 and stats["pri"] == 5
    assert stats["releases"] == 1
    assert await bs.peek_delayed() == Job(job_id, b"again")
    assert await bs.peek_ready() is None
    with pytest.raises(TimedOut):
        await bs.reserve(timeout=0)
    # kick moves a delayed job to ready when nothing is buried.
    assert await bs.kick(10) == 1
    assert (await bs.reserve(timeout=1)).id == job_id


async def test_release_without_delay_is_ready_again(bs: Beanstalk) -> None:
    job_id = await bs.put(b"x")
    await bs.reserve(timeout=1)
    await bs.release(job_id)
    assert await bs.peek_ready() == Job(job_id, b"x")


async def test_bury_kick_and_kick_job(bs: Beanstalk) -> None:
    a = await bs.put(b"a")
    b = await bs.put(b"b")
    for _ in range(2):
        job = await bs.reserve(timeout=1)
        await bs.bury(job.id, priority=3)
    assert (await bs.stats_job(a))["state"] == "buried"
    assert (await bs.stats_job(a))["buries"] == 1
    tube = await bs.stats_tube(tube_of(bs))
    assert tube["current-jobs-buried"] == 2 and tube["current-jobs-ready"] == 0
    assert await bs.peek_buried() == Job(a, b"a")
    await bs.kick_job(b)
    assert (await bs.stats_job(b))["state"] == "ready"
    assert (await bs.stats_job(b))["kicks"] == 1
    assert await bs.kick(100) == 1
    assert (await bs.stats_job(a))["state"] == "ready"
    assert await bs.peek_buried() is None
    assert await bs.kick(100) == 0
    with pytest.raises(NotFound):
        await bs.kick_job(a)  # ready, not buried or delayed


async def test_touch(bs: Beanstalk) -> None:
    job_id = await bs.put(b"slow", ttr=5)
    await bs.reserve(timeout=1)
    await bs.touch(job_id)
    stats = await bs.stats_job(job_id)
    assert stats["state"] == "reserved"
    assert stats["time-left"] >= 3  # type: ignore[operator]
    await bs.release(job_id)
    with pytest.raises(NotFound):
        await bs.touch(job_id)  # no longer reserved by us


async def test_not_found_errors(bs: Beanstalk) -> None:
    missing = 2**62
    for call in (
        bs.delete(missing),
        bs.release(missing),
        bs.bury(missing),
        bs.touch(missing),
        bs.kick_job(missing),
        bs.stats_job(missing),
    ):
        with pytest.raises(NotFound) as info:
            await call
        assert isinstance(info.value, BeanstalkServerError)
        assert str(missing) in info.value.command
        assert "NOT_FOUND" in str(info.value)
    assert await bs.peek(missing) is None
    with pytest.raises(NotFound):
        await bs.stats_tube("no_such_tube_" + str(missing))
    # The connection is still in step after all those errors.
    job_id = await bs.put(b"still fine")
    assert await bs.peek(job_id) == Job(job_id, b"still fine")


async def test_job_too_big(bs: Beanstalk) -> None:
    # The server runs with -z 65536.
    limit = (await bs.stats())["max-job-size"]
    assert isinstance(limit, int)
    with pytest.raises(JobTooBig) as info:
        await bs.put(b"x" * max(70 * 1024, limit + 1))
    assert "JOB_TOO_BIG" in str(info.value)
    # The server skipped the body: the next command on the same connection works.
    job_id = await bs.put(b"small")
    assert await bs.peek(job_id) == Job(job_id, b"small")


async def test_reserve_with_timeout_zero_times_out(bs: Beanstalk) -> None:
    started = time.monotonic()
    with pytest.raises(TimedOut):
        await bs.reserve(timeout=0)
    assert time.monotonic() - started < 2
    job_id = await bs.put(b"now there is one")
    assert (await bs.reserve(timeout=0)).id == job_id


async def test_reserve_waits_for_a_put(bs: Beanstalk, tube_settings: Settings) -> None:
    b = tube_settings.beanstalkd
    async with Beanstalk(b.host, b.port) as other:
        await other.use(b.tube)
        waiting = asyncio.create_task(bs.reserve(timeout=5))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        job_id = await other.put(b"wake up")
        job = await asyncio.wait_for(waiting, 5)
        assert job == Job(job_id, b"wake up")


async def test_peeks_stats_and_tube_lists(bs: Beanstalk, tube_settings: Settings) -> None:
    tube = tube_settings.beanstalkd.tube
    ready = await bs.put(b"ready")
    delayed = await bs.put(b"delayed", delay=60)
    buried = await bs.put(b"buried", priority=0)
    assert (await bs.reserve(timeout=1)).id == buried
    await bs.bury(buried)
    assert await bs.peek_ready() == Job(ready, b"ready")
    assert await bs.peek_delayed() == Job(delayed, b"delayed")
    assert await bs.peek_buried() == Job(buried, b"buried")
    assert await bs.peek(delayed) == Job(delayed, b"delayed")

    stats = await bs.stats()
    assert isinstance(stats["pid"], int) and stats["pid"] > 0
    assert isinstance(stats["version"], str)
    assert isinstance(stats["current-connections"], int) and stats["current-connections"] >= 1
    assert isinstance(stats["rusage-utime"], float)

    t = await bs.stats_tube(tube)
    assert t["name"] == tube
    assert (t["current-jobs-ready"], t["current-jobs-delayed"], t["current-jobs-buried"]) == (1, 1, 1)
    assert t["total-jobs"] == 3
    assert t["current-using"] >= 1 and t["current-watching"] >= 1  # type: ignore[operator]

    j = await bs.stats_job(delayed)
    assert j["id"] == delayed and j["tube"] == tube and j["state"] == "delayed" and j["delay"] == 60

    assert tube in await bs.list_tubes()
    assert "default" in await bs.list_tubes()
    assert await bs.list_tube_used() == tube
    assert await bs.list_tubes_watched() == [tube]


async def test_watch_and_ignore(bs: Beanstalk, tube_settings: Settings) -> None:
    other = tube_settings.beanstalkd.tube + "_b"
    assert await bs.watch(other) == 2
    assert sorted(await bs.list_tubes_watched()) == sorted([tube_settings.beanstalkd.tube, other])
    assert await bs.ignore(other) == 1
    with pytest.raises(NotIgnored):
        await bs.ignore(tube_settings.beanstalkd.tube)  # the last watched tube


async def test_unknown_command_is_typed(bs: Beanstalk) -> None:
    reply = await bs._call("frobnicate")
    with pytest.raises(UnknownCommand, match="frobnicate"):
        bs._check("frobnicate", reply, b"OK")
    assert await bs.list_tube_used() == tube_of(bs)


def test_yaml_parsing() -> None:
    body = b'---\nid: 5\ntube: "mails"\nstate: ready\npri: 1024\nrusage-utime: 0.25\nname: "123"\n'
    assert _parse_dict(body) == {
        "id": 5,
        "tube": "mails",
        "state": "ready",
        "pri": 1024,
        "rusage-utime": 0.25,
        "name": "123",
    }
    assert _parse_list(b"---\n- default\n- mails\n") == ["default", "mails"]


# --- pipelining ------------------------------------------------------------------------


async def test_500_concurrent_puts_on_one_connection(bs: Beanstalk) -> None:
    async def one(i: int) -> tuple[int, bytes]:
        body = f"task-{i}-".encode() + b"x" * (i % 37)
        return await bs.put(body, priority=i), body

    results = await asyncio.gather(*(one(i) for i in range(500)))
    ids = [job_id for job_id, _ in results]
    assert len(set(ids)) == 500
    # Each caller got the id of its own job: read every body back, concurrently as well.
    peeked = await asyncio.gather(*(bs.peek(job_id) for job_id in ids))
    for (job_id, body), job in zip(results, peeked, strict=True):
        assert job == Job(job_id, body)
    stats = await asyncio.gather(*(bs.stats_job(job_id) for job_id in ids[:100]))
    for i, s in enumerate(stats):
        assert s["id"] == ids[i] and s["pri"] == i
    assert (await bs.stats_tube(tube_of(bs)))["current-jobs-ready"] == 500


async def test_concurrent_mixed_commands_keep_replies_in_order(bs: Beanstalk) -> None:
    ids = [await bs.put(f"m{i}".encode()) for i in range(20)]

    async def mixed(i: int) -> None:
        kind = i % 4
        if kind == 0:
            assert await bs.peek(ids[i % 20]) == Job(ids[i % 20], f"m{i % 20}".encode())
        elif kind == 1:
            assert (await bs.stats_job(ids[i % 20]))["id"] == ids[i % 20]
        elif kind == 2:
            with pytest.raises(NotFound):
                await bs.delete(2**62 + i)
        else:
            new = await bs.put(f"n{i}".encode())
            assert (await bs.peek(new)) == Job(new, f"n{i}".encode())

    await asyncio.gather(*(mixed(i) for i in range(400)))


async def test_cancelled_caller_does_not_shift_replies(bs: Beanstalk) -> None:
    job_id = await bs.put(b"first")
    tasks = [asyncio.create_task(bs.peek(job_id)) for _ in range(50)]
    await asyncio.sleep(0)
    for t in tasks[::2]:
        t.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(done):
        if i % 2:
            assert result == Job(job_id, b"first")
    other = await bs.put(b"second")
    assert await bs.peek(other) == Job(other, b"second")


async def test_put_many(bs: Beanstalk) -> None:
    bodies = [f"bulk-{i}".encode() for i in range(300)]
    ids = await bs.put_many(bodies, priority=9, delay=0, ttr=40)
    assert len(ids) == 300 and all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == 300
    for job_id, body in zip(ids, bodies, strict=True):
        assert isinstance(job_id, int)
        assert await bs.peek(job_id) == Job(job_id, body)
    s = await bs.stats_job(ids[-1])  # type: ignore[arg-type]
    assert s["pri"] == 9 and s["ttr"] == 40
    assert await bs.put_many([]) == []


async def test_put_many_reports_per_job_errors(bs: Beanstalk) -> None:
    results = await bs.put_many([b"ok-1", b"y" * (70 * 1024), b"ok-2"])
    assert isinstance(results[0], int) and isinstance(results[2], int)
    assert isinstance(results[1], JobTooBig)
    assert await bs.peek(results[2]) == Job(results[2], b"ok-2")


async def test_put_many_concurrent_with_puts(bs: Beanstalk) -> None:
    async def single(i: int) -> tuple[int, bytes]:
        body = f"single-{i}".encode()
        return await bs.put(body), body

    batch_bodies = [f"batch-{i}".encode() for i in range(200)]
    batch, *singles = await asyncio.gather(bs.put_many(batch_bodies), *(single(i) for i in range(100)))
    for job_id, body in zip(batch, batch_bodies, strict=True):  # type: ignore[call-overload]
        assert await bs.peek(job_id) == Job(job_id, body)
    for job_id, body in singles:  # type: ignore[misc]
        assert await bs.peek(job_id) == Job(job_id, body)


# --- failures: fake servers ------------------------------------------------------------


class FakeServer:
    """Accepts connections and reads commands; answers nothing, or closes at once."""

    def __init__(self, *, close_after_first: bool) -> None:
        self.close_after_first = close_after_first
        self.received = bytearray()
        self.peer_closed = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    self.peer_closed.set()
                    return
                self.received += data
                if self.close_after_first:
                    writer.close()
                    return
        except ConnectionError:
            self.peer_closed.set()
        finally:
            writer.close()

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


async def test_reply_timeout_fails_every_pending_call() -> None:
    async with FakeServer(close_after_first=False) as fake:
        client = Beanstalk("127.0.0.1", fake.port, command_timeout=0.3)
        await client.connect()
        started = time.monotonic()
        results = await asyncio.gather(
            client.put(b"a"), client.put(b"b"), client.stats(), client.peek(1), return_exceptions=True
        )
        assert time.monotonic() - started < 2
        assert all(isinstance(r, BeanstalkTimeoutError) for r in results), results
        assert "did not answer" in str(results[0])
        assert f"127.0.0.1:{fake.port}" in str(results[0])
        assert b"put 1024 0 120 1\r\na\r\n" in fake.received
        # The connection is closed: the server sees it go, and new calls fail at once.
        await asyncio.wait_for(fake.peer_closed.wait(), 2)
        assert not client.connected
        with pytest.raises(BeanstalkConnectionError, match="reconnect"):
            await client.put(b"c")
        await client.close()


async def test_dropped_connection_fails_pending_calls() -> None:
    async with FakeServer(close_after_first=True) as fake:
        client = Beanstalk("127.0.0.1", fake.port, command_timeout=5)
        await client.connect()
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.put(f"{i}".encode()) for i in range(10)), return_exceptions=True
        )
        assert time.monotonic() - started < 2  # at once, not after the command timeout
        assert all(isinstance(r, BeanstalkConnectionError) for r in results), results
        assert "lost the connection" in str(results[0])
        assert not client.connected
        with pytest.raises(BeanstalkConnectionError):
            await client.stats()
        await client.close()


async def test_garbage_reply_is_a_protocol_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"WHAT IS THIS\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Beanstalk("127.0.0.1", port, command_timeout=2) as client:
            with pytest.raises(BeanstalkProtocolError, match="WHAT"):
                await client.use("x")
    finally:
        server.close()


async def test_connect_refused_is_a_clear_error() -> None:
    port = free_port()
    client = Beanstalk("127.0.0.1", port, connect_timeout=2)
    with pytest.raises(BeanstalkConnectionError, match=f"cannot connect to beanstalkd at 127.0.0.1:{port}"):
        await client.connect()
    with pytest.raises(BeanstalkConnectionError, match="not connected"):
        await client.put(b"x")


# --- a server restart, on a beanstalkd of our own ----------------------------------------


@pytest.fixture
def own_beanstalkd(tmp_path: Path) -> Iterator[Callable[[], OwnBeanstalkd]]:
    started: list[OwnBeanstalkd] = []

    def make() -> OwnBeanstalkd:
        (tmp_path / "binlog").mkdir(exist_ok=True)
        server = OwnBeanstalkd(tmp_path / "binlog")
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.kill()


async def test_server_restart_reconnect_restores_state(own_beanstalkd: Callable[[], OwnBeanstalkd]) -> None:
    server = own_beanstalkd()
    client = Beanstalk("127.0.0.1", server.port, command_timeout=3)
    await client.connect()
    await client.use("restart_tube")
    await client.watch("restart_tube")
    await client.ignore("default")
    job_id = await client.put(b"survives the restart")
    delayed_id = await client.put(b"later", delay=3600)

    server.kill()
    started = time.monotonic()
    with pytest.raises(BeanstalkConnectionError) as info:
        await client.stats()
    assert time.monotonic() - started < 2
    assert f"127.0.0.1:{server.port}" in str(info.value)
    assert "reconnect" in str(info.value)
    assert not client.connected
    # While the server is down, reconnecting fails clearly too.
    with pytest.raises(BeanstalkConnectionError, match="cannot connect"):
        await client.reconnect()

    server.start()  # same port, same binlog
    await client.reconnect()
    assert client.connected
    assert await client.list_tube_used() == "restart_tube"
    assert await client.list_tubes_watched() == ["restart_tube"]
    job = await client.reserve(timeout=2)
    assert job == Job(job_id, b"survives the restart")
    await client.delete(job.id)
    assert await client.peek_delayed() == Job(delayed_id, b"later")
    assert (await client.stats_job(delayed_id))["tube"] == "restart_tube"
    await client.close()


async def test_close_fails_pending_and_is_idempotent(bs: Beanstalk, tube_settings: Settings) -> None:
    b = tube_settings.beanstalkd
    client = Beanstalk(b.host, b.port)
    await client.connect()
    await client.watch(b.tube)
    await client.ignore("default")
    waiting = asyncio.create_task(client.reserve(timeout=10))
    await asyncio.sleep(0.05)
    await client.close()
    with pytest.raises(BeanstalkConnectionError, match="closed by the client"):
        await asyncio.wait_for(waiting, 2)
    await client.close()
    assert not client.connected
    # A job put afterwards is not held by the closed connection.
    job_id = await bs.put(b"free")
    assert (await bs.reserve(timeout=1)).id == job_id


async def test_context_manager(tube_settings: Settings) -> None:
    b = tube_settings.beanstalkd
    async with Beanstalk(b.host, b.port) as client:
        assert client.connected
        assert "connected" in repr(client)
    assert not client.connected
