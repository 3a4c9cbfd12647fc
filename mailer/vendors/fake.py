"""A scriptable vendor for tests: each send takes the next scripted outcome."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass

from mailer.errors import VendorError
from mailer.models import Email
from mailer.vendors.base import SendResult

Outcome = VendorError | Callable[[Email, str], VendorError | None] | None


@dataclass
class FakeSend:
    mail_id: str
    email: Email
    ok: bool


class FakeVendor:
    """Succeeds unless scripted otherwise.

    ``script`` entries are consumed one per send: ``None`` succeeds, an exception instance
    is raised. ``default`` applies once the script is empty (``None`` = succeed). ``hang``
    makes sends wait until released, to test timeouts and shutdown.
    """

    def __init__(
        self, name: str, *, default: Outcome = None, latency_s: float = 0.0, timeout_s: float = 10.0
    ) -> None:
        self.name = name
        self.script: collections.deque[Outcome] = collections.deque()
        self.default = default
        self.latency_s = latency_s
        # What a real adapter's deadline would be: a graceful stop waits this long for a send.
        self.timeout_s = timeout_s
        self.sends: list[FakeSend] = []
        self.hang = asyncio.Event()
        self.hang.set()

    def __repr__(self) -> str:
        return f"<FakeVendor {self.name} sends={len(self.sends)}>"

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @property
    def delivered(self) -> list[str]:
        return [s.mail_id for s in self.sends if s.ok]

    async def send(self, email: Email, mail_id: str) -> SendResult:
        await self.hang.wait()
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        outcome = self.script.popleft() if self.script else self.default
        error = outcome(email, mail_id) if callable(outcome) else outcome
        self.sends.append(FakeSend(mail_id, email, error is None))
        if error is not None:
            raise error
        return SendResult(f"fake-{self.name}-{len(self.sends)}")
