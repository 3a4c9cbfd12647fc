"""The vendor used whenever ``MAILER_ENV`` is not ``production``: nothing leaves the machine.

Each configured vendor name gets a simulated stand-in, so round robin, failover and the
stored records look exactly as they will in production. Latency and a failure rate can be
dialled in for load tests.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import random

from mailer.capabilities import LIMITS, enforce
from mailer.errors import TransientVendorError, VendorThrottled
from mailer.models import Email
from mailer.vendors.base import SendResult

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
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate
        self.throttle_rate = throttle_rate
        self.throttle_retry_after_s = throttle_retry_after_s
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
        self.count += 1
        message_id = f"{self._prefix}-{next(self._ids)}"
        self.sent.append((mail_id, message_id))
        log.debug("simulated %s sent mail %s as %s", self.name, mail_id, message_id)
        return SendResult(message_id)
