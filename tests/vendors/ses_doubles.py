"""Test doubles for the SES adapter: moto in server mode, and a tiny scripted SES endpoint.

moto answers real ``SendEmail`` calls and keeps what was sent, but it cannot throttle, pause
an account or hang; the scripted endpoint does those over a real socket, so botocore's own
response parsing (``x-amzn-ErrorType`` plus a JSON ``message``) and its retry decision are
what the tests exercise, and every request that reaches it is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import aioboto3
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from mailer.config import AmazonSettings

REGION = "us-east-1"
DUMMY_KEY_ID = "AKIATESTONLY0000KEY"
DUMMY_SECRET = "dummy-secret-never-logged-0123456789"


def free_port() -> int:
    """A port that was free a moment ago: connecting to it is refused until someone binds it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ses_settings(endpoint_url: str, **updates: Any) -> AmazonSettings:
    values: dict[str, Any] = {
        "region": REGION,
        "access_key_id": SecretStr(DUMMY_KEY_ID),
        "secret_access_key": SecretStr(DUMMY_SECRET),
        "endpoint_url": endpoint_url,
        "timeout_s": 2.0,
    }
    values.update(updates)
    return AmazonSettings(**values)


class MotoSes:
    """moto's server on 127.0.0.1 and a free port, plus access to what it "sent"."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    async def verify(self, identity: str) -> None:
        """moto refuses mail from unverified identities, like SES; this verifies one."""
        session = aioboto3.Session(
            aws_access_key_id=DUMMY_KEY_ID, aws_secret_access_key=DUMMY_SECRET, region_name=REGION
        )
        async with session.client("sesv2", endpoint_url=self.url) as client:
            await client.create_email_identity(EmailIdentity=identity)

    async def sent(self, kind: str, message_id: str) -> dict[str, Any]:
        """One stored message: kind "Message" (Simple content) or "RawMessage" (Raw content).

        sesv2 stores into the SES v1 backend, so the records sit under "ses" in data.json.
        """

        def fetch() -> Any:
            with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=5) as resp:
                return json.load(resp)

        data = await asyncio.to_thread(fetch)
        for record in data["ses"][kind]:
            if record["id"] == message_id:
                return dict(record)
        raise AssertionError(f"moto has no {kind} with id {message_id!r}")


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def ses_error(status: int, code: str, message: str, **headers: str) -> Answer:
    """An error the way SES v2 (restJson) sends it: the code in a header, the text in JSON."""
    return Answer(status, {"message": message}, {"x-amzn-ErrorType": code, **headers})


HANG = "hang"  # read the request, never answer
DROP = "drop"  # read the request, close the connection without answering


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeSes:
    """An HTTP/1.1 endpoint on 127.0.0.1 that answers every request with ``action``."""

    def __init__(self, action: Answer | str = Answer(200, {"MessageId": "fake-message-id"})) -> None:
        self.action = action
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                line, *rest = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Request(method, path, headers, body))
                if self.action == HANG:
                    await reader.read()  # until the client gives up and closes
                    return
                if self.action == DROP:
                    return
                assert isinstance(self.action, Answer)
                payload = json.dumps(self.action.body).encode()
                reply_headers = {
                    "Content-Type": "application/json",
                    "Content-Length": str(len(payload)),
                    "x-amzn-RequestId": f"req-{len(self.requests)}",
                    **self.action.headers,
                }
                writer.write(
                    f"HTTP/1.1 {self.action.status} X\r\n".encode()
                    + "".join(f"{k}: {v}\r\n" for k, v in reply_headers.items()).encode()
                    + b"\r\n"
                    + payload
                )
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
