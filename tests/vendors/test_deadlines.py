"""``timeout_s`` bounds a whole send, in every adapter, against vendors that trickle.

Client libraries time each read (or each SMTP reply), so a vendor sending one byte every 0.2 s
never trips them; each test here would take from seconds to minutes without a deadline on the
whole send, and ``within`` (a bounded wait) fails it fast instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from mailer.config import MailgunSettings, SendinblueSettings, SmtpSettings, SparkpostSettings
from mailer.errors import TransientVendorError
from mailer.vendors._http import HttpVendor
from mailer.vendors.amazon import AmazonVendor
from mailer.vendors.base import SendResult
from mailer.vendors.mailgun import MailgunVendor
from mailer.vendors.sendinblue import SendinblueVendor
from mailer.vendors.smtp import SmtpVendor
from mailer.vendors.sparkpost import SparkpostVendor

from .http_doubles import (
    BREVO_KEY,
    MAILGUN_DOMAIN,
    MAILGUN_KEY,
    SPARKPOST_KEY,
    BrevoDouble,
    HttpDouble,
    MailgunDouble,
    Reply,
    SesDouble,
    SparkpostDouble,
    Trickle,
    sample_email,
)
from .ses_doubles import ses_settings

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 0.5
SLACK = 0.5  # scheduling on a loaded 2-core machine; a missing deadline overshoots by seconds
WITHIN = 4.0  # bounded wait: without the fix a send would run far past this


async def timed(send: Awaitable[SendResult]) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(TransientVendorError) as caught:
        async with asyncio.timeout(WITHIN):
            await send
    return caught.value, time.monotonic() - started


# --- HTTP vendors and SES ----------------------------------------------------------------


def mailgun(base_url: str, timeout_s: float) -> MailgunVendor:
    values = {"domain": MAILGUN_DOMAIN, "api_key": MAILGUN_KEY, "base_url": base_url, "timeout_s": timeout_s}
    return MailgunVendor(MailgunSettings.model_validate(values))


def brevo(base_url: str, timeout_s: float) -> SendinblueVendor:
    values = {"api_key": BREVO_KEY, "base_url": base_url, "timeout_s": timeout_s}
    return SendinblueVendor(SendinblueSettings.model_validate(values))


def sparkpost(base_url: str, timeout_s: float) -> SparkpostVendor:
    values = {"api_key": SPARKPOST_KEY, "base_url": base_url, "timeout_s": timeout_s}
    return SparkpostVendor(SparkpostSettings.model_validate(values))


def ses(base_url: str, timeout_s: float) -> AmazonVendor:
    return AmazonVendor(ses_settings(base_url, timeout_s=timeout_s))


HttpLike = HttpVendor | AmazonVendor
CASES: dict[str, tuple[Callable[[], HttpDouble], Callable[[str, float], HttpLike]]] = {
    "mailgun": (MailgunDouble, mailgun),
    "brevo": (BrevoDouble, brevo),
    "sparkpost": (SparkpostDouble, sparkpost),
    "ses": (SesDouble, ses),
}
# Big enough for every adapter to read as success, were it ever complete.
ANSWER = Reply(200, {"id": "<1@x>", "messageId": "<1@x>", "MessageId": "1", "results": {"id": "1"}})


@pytest.fixture(params=list(CASES))
async def http_case(request: pytest.FixtureRequest) -> AsyncIterator[tuple[HttpDouble, HttpLike]]:
    make_double, make_vendor = CASES[request.param]
    double = make_double()
    await double.start()
    vendor = make_vendor(double.base_url, TIMEOUT)
    await vendor.connect()
    yield double, vendor
    await vendor.close()
    await double.stop()


async def test_a_trickled_answer_ends_at_the_deadline_as_ambiguous(
    http_case: tuple[HttpDouble, HttpLike],
) -> None:
    double, vendor = http_case
    double.script(Trickle(ANSWER, interval=0.2))

    error, elapsed = await timed(vendor.send(sample_email(attachments=[]), "slow"))

    assert elapsed < TIMEOUT + SLACK
    assert isinstance(error, TransientVendorError) and error.ambiguous is True
    assert "timed out" in str(error) and "may have accepted" in str(error)
    assert len(double.requests) == 1  # one attempt, and the vendor did get it
    assert (await vendor.send(sample_email(attachments=[]), "next")).message_id  # and it recovers


class SilentTls:
    """Accepts TCP, then trickles the start of a TLS record that never completes: the
    handshake, hence any byte of the request, never happens."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> SilentTls:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            for byte in b"\x16\x03\x03\x40\x00" + b"\x02" * 0x4000:  # handshake record, 16 KiB
                writer.write(bytes((byte,)))
                await writer.drain()
                await asyncio.sleep(0.2)
        except ConnectionError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


@pytest.mark.parametrize("name", ["mailgun", "brevo", "sparkpost"])
async def test_a_handshake_that_never_ends_is_a_deadline_before_sending(name: str) -> None:
    async with SilentTls() as tls, CASES[name][1](f"https://127.0.0.1:{tls.port}", TIMEOUT) as vendor:
        error, elapsed = await timed(vendor.send(sample_email(attachments=[]), "tls"))
    assert elapsed < TIMEOUT + SLACK
    assert isinstance(error, TransientVendorError) and error.ambiguous is False


# --- SMTP --------------------------------------------------------------------------------


@dataclass
class TricklingRelay:
    """A minimal SMTP server that sends the replies named in ``slow`` one byte at a time.

    Phases: greeting, EHLO, MAIL, RCPT, DATA (the 354) and END (the reply after the data).
    Each slow reply takes ``per_reply`` seconds in all, under the client's per-reply timeout.
    """

    slow: set[str]
    per_reply: float = 0.4
    delivered: int = 0
    port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> TricklingRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reply(self, writer: asyncio.StreamWriter, phase: str, text: str) -> None:
        data = text.encode() + b"\r\n"
        if phase not in self.slow:
            writer.write(data)
            await writer.drain()
            return
        for byte in data:
            writer.write(bytes((byte,)))
            await writer.drain()
            await asyncio.sleep(self.per_reply / len(data))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        replies = {
            "EHLO": "250-relay\r\n250 8BITMIME",
            "HELO": "250 relay",
            "MAIL": "250 OK",
            "RCPT": "250 OK",
        }
        try:
            await self._reply(writer, "greeting", "220 relay ESMTP")
            while line := await reader.readline():
                verb = line[:4].decode().upper()
                if verb in replies:
                    await self._reply(writer, verb, replies[verb])
                elif verb == "DATA":
                    await self._reply(writer, "DATA", "354 go ahead")
                    await reader.readuntil(b"\r\n.\r\n")
                    self.delivered += 1
                    await self._reply(writer, "END", f"250 2.0.0 Ok: queued as T{self.delivered}")
                elif verb == "QUIT":
                    await self._reply(writer, "QUIT", "221 bye")
                    return
                else:
                    await self._reply(writer, verb, "250 OK")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()


def smtp(port: int) -> SmtpVendor:
    return SmtpVendor(SmtpSettings(host="127.0.0.1", port=port, starttls=False, timeout_s=TIMEOUT))


async def test_smtp_replies_trickled_before_data_are_a_deadline_before_sending() -> None:
    slow = {"greeting", "EHLO", "MAIL", "RCPT", "DATA"}
    async with TricklingRelay(slow=slow) as relay, smtp(relay.port) as vendor:
        error, elapsed = await timed(vendor.send(sample_email(attachments=[]), "slow"))
    assert elapsed < TIMEOUT + SLACK
    assert isinstance(error, TransientVendorError) and error.ambiguous is False
    assert "timed out at" in str(error) and "not sent" in str(error)
    assert relay.delivered == 0


async def test_smtp_trickled_after_data_is_an_ambiguous_deadline() -> None:
    async with TricklingRelay(slow={"DATA", "END"}) as relay, smtp(relay.port) as vendor:
        error, elapsed = await timed(vendor.send(sample_email(attachments=[]), "slow"))
        relay.slow.clear()
        result = await vendor.send(sample_email(attachments=[]), "next")  # a fresh connection
    assert elapsed < TIMEOUT + SLACK
    assert isinstance(error, TransientVendorError) and error.ambiguous is True
    assert "timed out at DATA" in str(error)
    assert result.message_id == "T2"
