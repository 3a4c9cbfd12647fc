"""The one abstraction every vendor adapter implements.

An adapter maps an :class:`~mailer.models.Email` to its vendor's API and the vendor's
answer to a :class:`SendResult` or to one of three error classes; routing, failover,
retries and storage happen elsewhere, so adapters know nothing of the queue or MongoDB.

- :class:`~mailer.errors.TransientVendorError`: try another vendor, mark this one down
  (timeouts, connection errors, 5xx, 429, throttling). ``ambiguous=True`` when the request
  may have been accepted (the read timed out after sending).
- :class:`~mailer.errors.PermanentVendorError`: the message itself is refused; fail the
  mail, keep the vendor.
- :class:`~mailer.errors.VendorAuthError`: credentials or account problem; mark the vendor
  down and log loudly.

Every adapter stamps :data:`~mailer.models.MAIL_ID_HEADER` with our mail id so a duplicate
send (possible after an ambiguous failure) can be traced at the recipient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mailer.errors import PermanentVendorError, TransientVendorError, VendorAuthError, VendorError
from mailer.models import MAIL_ID_HEADER, Email

__all__ = [
    "MAIL_ID_HEADER",
    "PermanentVendorError",
    "SendResult",
    "TransientVendorError",
    "Vendor",
    "VendorAuthError",
    "VendorError",
]


@dataclass(frozen=True, slots=True)
class SendResult:
    """A vendor accepted the mail; ``message_id`` is the vendor's own id for it."""

    message_id: str


@runtime_checkable
class Vendor(Protocol):
    """A way to send mail. Long-lived: ``connect`` once per process, ``close`` at exit."""

    name: str

    async def connect(self) -> None:
        """Open long-lived clients (HTTP connection pools, SDK clients)."""

    async def send(self, email: Email, mail_id: str) -> SendResult:
        """Deliver one mail or raise one of the three vendor error classes."""
        ...

    async def close(self) -> None:
        """Release what ``connect`` opened; safe to call twice."""
