"""The vendor used whenever ``MAILER_ENV`` is not ``production``: nothing leaves the machine.

Each configured vendor name gets a simulated stand-in, so round robin, failover and the
stored records look exactly as they will in production. Latency and a failure rate can be
dialled in for load tests.

With ``keep_raw`` (``[simulation] keep_raw``, on by default) each send also renders the whole
MIME message through :mod:`mailer.vendors.mime`, the SMTP vendor's builder, and returns it on
the :class:`SendResult`: the development outbox then shows exactly what would have gone out.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import random

from mailer.capabilities import LIMITS, enforce
from mailer.errors import PermanentVendorError, TransientVendorError, VendorThrottled
from mailer.models import Email
from mailer.vendors.base import SendResult
from mailer.vendors.mime import (
    build_message,
    make_message_id,
    message_bytes,
    metadata_headers,
    needs_smtputf8,
)

log = logging.getLogger("mailer.vendors.simulated")


class SimulatedVendor:
    """Records each send (the last ``keep`` of them) and returns a made-up message id."""

    def __init__(
        self,
        name: str,
        *,
        latency_ms: float = 0.0,
        failure_rate: float = 0.0,
        throttle_rate: float = 0.0,
        throttle_retry_after_s: float = 1.0,
        keep: int = 1000,
        keep_raw: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate
        self.throttle_rate = throttle_rate
        self.throttle_retry_after_s = throttle_retry_after_s
        self.keep_raw = keep_raw
        self.sent: collections.deque[tuple[str, str]] = collections.deque(maxlen=keep)
        self.count = 0
        self._rng = rng or random.Random()
        self._ids = itertools.count(1)
        self._prefix = f"sim-{name}-{os.getpid()}"

    def __repr__(self) -> str:
        return f"<SimulatedVendor {self.name} sent={self.count}>"

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, email: Email, mail_id: str) -> SendResult:
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        if self.failure_rate and self._rng.random() < self.failure_rate:
            raise TransientVendorError(self.name, "simulated failure")
        if self.throttle_rate and self._rng.random() < self.throttle_rate:
            retry_after = self.throttle_retry_after_s or None
            raise VendorThrottled(self.name, "simulated throttling (429)", retry_after=retry_after)
        # Refuse what this vendor could not carry in production, so development sees it too.
        check = LIMITS.get(self.name)
        if check is not None:
            enforce(check, self.name, email)
        raw = self._render(email, mail_id) if self.keep_raw else None
        self.count += 1
        message_id = f"{self._prefix}-{next(self._ids)}"
        self.sent.append((mail_id, message_id))
        log.debug("simulated %s sent mail %s as %s", self.name, mail_id, message_id)
        return SendResult(message_id, raw=raw)

    def _render(self, email: Email, mail_id: str) -> bytes:
        """The bytes the SMTP vendor would put on DATA, built the same way (same headers,
        metadata header and encodings), so the outbox is what a relay would have received;
        a mail that cannot be rendered fails as it would there."""
        try:
            msg = build_message(
                email,
                mail_id,
                message_id=make_message_id(email),
                extra_headers=metadata_headers(email.metadata),
                utf8=needs_smtputf8(email),
            )
            return message_bytes(msg)
        except ValueError as exc:
            raise PermanentVendorError(self.name, f"cannot build the message: {exc}") from None
