"""Vendor doubles for the fault scenarios in which time passes on the vendor's side: a slow
vendor (its latency is its own processing) and one that trickles its answer a byte at a time.

They speak each vendor's real wire format by reusing tests/vendors/http_doubles.py: its
request parser, its per-vendor checks and success bodies and its response encoder. What they
add is what a fault tally needs: every send counted by our ``X-Mailer-Id``, with when it
arrived, when the vendor accepted it and when (or whether) the answer reached the socket.

What counts as *accepted* decides whether a failover is a duplicate, so it is explicit:

- ``accept_on="processed"`` (the default): the vendor has the mail once its latency has
  passed, whether the client is still waiting or not, as a real vendor that received the
  whole request goes on and sends it. A client that gives up (is cancelled, stopped, times
  out) and fails over then really sends twice, and the tally sees it.
- ``accept_on="answered"``: only once the last byte of the success answer was written; a
  client that hung up before that is counted as not accepted. (A real vendor may have sent
  such a mail: scenarios list those requests as the ambiguous window.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, SecretStr
from vendors.http_doubles import (
    BREVO_KEY,
    MAILGUN_DOMAIN,
    MAILGUN_KEY,
    SPARKPOST_KEY,
    BrevoDouble,
    HttpDouble,
    LoopbackServer,
    MailgunDouble,
    RecordedRequest,
    Reply,
    SparkpostDouble,
    _encode,
    _read_request,
)

from mailer.config import MailgunSettings, SendinblueSettings, SparkpostSettings
from mailer.models import MAIL_ID_HEADER

Kind = Literal["mailgun", "sendinblue", "sparkpost"]
AcceptOn = Literal["processed", "answered"]


@dataclass
class Send:
    """One request that carried a mail, as the vendor saw it (monotonic times)."""

    mail_id: str
    received_at: float
    accepted_at: float | None = None
    answered_at: float | None = None  # the last byte of the answer was written
    hung_up_at: float | None = None  # the client was gone before that

    @property
    def ended_at(self) -> float | None:
        return self.answered_at or self.hung_up_at


class CountingVendor(LoopbackServer):
    """One vendor's HTTP API on 127.0.0.1 that takes ``latency_s`` to decide and, with
    ``trickle_s``, writes its answer one byte every ``trickle_s`` seconds."""

    def __init__(
        self,
        kind: Kind,
        *,
        latency_s: float = 0.0,
        trickle_s: float | None = None,
        accept_on: AcceptOn = "processed",
    ) -> None:
        super().__init__()
        self.kind = kind
        self.latency_s = latency_s
        self.trickle_s = trickle_s
        self.accept_on = accept_on
        self.checker: HttpDouble = {"mailgun": MailgunDouble, "sendinblue": BrevoDouble,
                                    "sparkpost": SparkpostDouble}[kind]()  # fmt: skip
        self.sends: list[Send] = []
        self.problems: list[str] = []  # requests the vendor would have refused

    def __repr__(self) -> str:
        return f"<CountingVendor {self.kind} :{self.port} {len(self.sends)} sends>"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def section(self, *, timeout_s: float) -> BaseModel:
        """The ``[vendors.KIND]`` section that points the real adapter at this double."""
        assert self.port, f"{self!r}: start it before asking for its base_url"
        if self.kind == "mailgun":
            return MailgunSettings(domain=MAILGUN_DOMAIN, api_key=SecretStr(MAILGUN_KEY),
                                   base_url=self.base_url, timeout_s=timeout_s)  # fmt: skip
        where = {"base_url": self.base_url, "timeout_s": timeout_s}
        if self.kind == "sendinblue":
            return SendinblueSettings(api_key=SecretStr(BREVO_KEY), **where)
        return SparkpostSettings(api_key=SecretStr(SPARKPOST_KEY), **where)

    # --- counting ----------------------------------------------------------------------

    def received(self) -> collections.Counter[str]:
        return collections.Counter(s.mail_id for s in self.sends)

    def accepted(self) -> collections.Counter[str]:
        return collections.Counter(s.mail_id for s in self.sends if s.accepted_at is not None)

    def received_before(self, moment: float) -> set[str]:
        return {s.mail_id for s in self.sends if s.received_at <= moment}

    def durations(self, now: float | None = None) -> list[float]:
        """Seconds each request held the vendor (until answered or hung up; unfinished: until now)."""
        now = time.monotonic() if now is None else now
        return [(s.ended_at or now) - s.received_at for s in self.sends]

    def unfinished(self) -> int:
        return sum(1 for s in self.sends if s.ended_at is None)

    # --- the server --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = next(self._connections)
        try:
            while (request := await _read_request(reader, connection)) is not None:
                if not await self._answer(request, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _mail_id(self, request: RecordedRequest) -> str | None:
        try:
            if self.kind == "mailgun":
                found = request.fields(f"h:{MAIL_ID_HEADER}")
                return found[0] if found else None
            body = request.json()
            headers = body["headers"] if self.kind == "sendinblue" else body["content"]["headers"]
            value = headers.get(MAIL_ID_HEADER)
            return value if isinstance(value, str) else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    async def _answer(
        self, request: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False once the client is gone."""
        self.checker.requests.append(request)  # its success bodies number themselves by it
        refusal = self.checker.check(request)
        mail_id = self._mail_id(request)
        if refusal is not None or mail_id is None:
            self.problems.append(f"{request.method} {request.path}: {request.problems or 'no mail id'}")
            return await self._write(reader, writer, _encode(refusal or Reply(400, {"message": "no id"})))
        send = Send(mail_id, time.monotonic())
        self.sends.append(send)
        await asyncio.sleep(self.latency_s)
        if self.accept_on == "processed":
            send.accepted_at = time.monotonic()
        if await self._write(reader, writer, _encode(self.checker.success(request))):
            send.answered_at = time.monotonic()
            if self.accept_on == "answered":
                send.accepted_at = send.answered_at
            return True
        send.hung_up_at = time.monotonic()
        return False

    async def _write(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bool:
        """Write all of ``data`` (a byte per ``trickle_s`` when trickling); False if the
        client hung up first (seen between bytes, so within one ``trickle_s``)."""
        chunks = [data] if self.trickle_s is None else [data[i : i + 1] for i in range(len(data))]
        for i, chunk in enumerate(chunks):
            if reader.at_eof() or writer.is_closing() or reader.exception() is not None:
                return False
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                return False
            if self.trickle_s is not None and i < len(chunks) - 1:
                await asyncio.sleep(self.trickle_s)
        return True


def accepted_sends(doubles: Iterable[CountingVendor]) -> collections.Counter[str]:
    """Vendor-side accepted sends by mail id, over every double."""
    total: collections.Counter[str] = collections.Counter()
    for double in doubles:
        total.update(double.accepted())
    return total


@contextlib.asynccontextmanager
async def serving(*doubles: CountingVendor) -> AsyncIterator[tuple[CountingVendor, ...]]:
    """Start the doubles; stop them (and cancel what they are still answering) afterwards."""
    try:
        for double in doubles:
            await double.start()
        yield doubles
    finally:
        for double in doubles:
            await double.stop()
