"""The HTTP API's benchmark cases: ``POST /v1/emails`` from 50 keep-alive clients and
``POST /v1/emails/batch`` with 1,000 mails per request, against the real ``mailer-api``
child process, each compared (in the table) with the SDK's ``send``/``send_many`` of the
same run. The API's CPU per mail is read from /proc.

The clients are a few lines of raw HTTP/1.1 over asyncio streams, not httpx: on 2 cores an
HTTP client's own CPU would be taken from the server it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from loadtest.cases import scratch
from loadtest.common import child_env, free_port, sample_mail
from loadtest.procstat import cpu_seconds
from loadtest.raw import Measure
from mailer.config import Settings

CLIENTS = 50
BATCH = 1000
START_TIMEOUT_S = 30.0


class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its whole answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def api_process(settings: Settings, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """``mailer-api --test`` on ``settings``' tube and collections; stopped on the way out."""
    cmd = [sys.executable, "-m", "mailer.service", "--test", "--port", str(port), "-l", "WARNING"]
    env = child_env(settings, measure_throughput=False)
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                conn = await Connection.open(port)
                break
            except OSError:
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mailer-api did not start (exit {proc.returncode})") from None
                await asyncio.sleep(0.05)
        status, _ = await conn.request("GET", "/v1/ready")
        conn.close()
        if status != 200:
            raise RuntimeError(f"mailer-api is not ready ({status})")
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _timed_api(pid: int, mails: int, work: Callable[[], Any]) -> Measure:
    """Time ``work``, with the API process's CPU (not this one's) as the measure's CPU."""
    c0, t0 = cpu_seconds(pid) or 0.0, time.perf_counter()
    await work()
    return Measure(mails, time.perf_counter() - t0, (cpu_seconds(pid) or 0.0) - c0)


def _check(status: int, body: bytes) -> None:
    if status != 202:
        raise RuntimeError(f"mailer-api answered {status}: {body[:300]!r}")


async def send_case(base: Settings, n: int, port: int) -> Measure:
    """``n`` single-mail POSTs from ``CLIENTS`` keep-alive connections."""
    bodies = [json.dumps(sample_mail("bench-api", i)).encode() for i in range(n)]
    async with scratch(base, "ba") as settings, api_process(settings, port) as proc:
        conns = [await Connection.open(port) for _ in range(CLIENTS)]
        queue = iter(bodies)

        async def client(conn: Connection) -> None:
            for body in queue:
                _check(*await conn.request("POST", "/v1/emails", body))

        async def gather_clients() -> None:
            await asyncio.gather(*(client(c) for c in conns))

        measure = await _timed_api(proc.pid, n, gather_clients)
        for c in conns:
            c.close()
    return measure


async def batch_case(base: Settings, n: int, port: int) -> Measure:
    """``n`` mails as requests of ``BATCH`` mails each, one after another."""
    bodies = [
        json.dumps({"emails": [sample_mail("bench-api", i) for i in range(s, min(n, s + BATCH))]}).encode()
        for s in range(0, n, BATCH)
    ]
    async with scratch(base, "bb") as settings, api_process(settings, port) as proc:
        conn = await Connection.open(port)

        async def post_batches() -> None:
            for body in bodies:
                _check(*await conn.request("POST", "/v1/emails/batch", body))

        measure = await _timed_api(proc.pid, n, post_batches)
        conn.close()
    return measure


async def run(base: Settings, sends: int, batched: int, note: Callable[[str, str], None]) -> dict[str, float]:
    """Both cases; the row values for the table (rates and the API's CPU per mail)."""
    values: dict[str, float] = {}
    for key, case, n in (("api_send", send_case, sends), ("api_batch", batch_case, batched)):
        m = await case(base, n, free_port())
        values[key], values[f"cpu_{key}"] = m.rate, m.cpu_us
        note(key, f"{m.rate:,.0f} mails/s; mailer-api CPU us/mail {m.cpu_us:,.0f}")
    return values
