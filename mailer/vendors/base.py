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

import asyncio
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from mailer.errors import PermanentVendorError, TransientVendorError, VendorAuthError, VendorError
from mailer.models import MAIL_ID_HEADER, Email
from mailer.redact import Redactor

__all__ = [
    "MAIL_ID_HEADER",
    "PermanentVendorError",
    "SendProgress",
    "SendResult",
    "TransientVendorError",
    "Vendor",
    "VendorAuthError",
    "VendorError",
    "bounded_send",
    "current_progress",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SendResult:
    """A vendor accepted the mail; ``message_id`` is the vendor's own id for it. ``raw`` is
    the whole MIME message, only from the simulated vendor (the development outbox)."""

    message_id: str
    raw: bytes | None = None


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


# --- the one way out of every adapter's send: a deadline and redaction ------------------


class SendProgress:
    """How far one send got, told by the transport, so a deadline can be classified.

    Failing over is safe only while nothing of the request can have reached the vendor.
    Transports that can see their own progress (httpx, aiohttp traces, SMTP stages) call
    :meth:`connecting` and :meth:`sent`; one that can only say "the SDK is sending now"
    calls :meth:`handed_over`, which counts as sent unless a trace later says it is still
    connecting: an unobserved transport errs on the side of "may be delivered twice".
    """

    __slots__ = ("_connecting", "_handed_over", "_sent", "stage")

    def __init__(self) -> None:
        self._handed_over = False
        self._connecting = False
        self._sent = False
        self.stage = ""  # where the send was, for the message ("DATA", "connect"...)

    def handed_over(self) -> None:
        self._handed_over = True

    def connecting(self) -> None:
        self._connecting = True

    def sent(self) -> None:
        self._sent = True

    @property
    def may_have_reached_vendor(self) -> bool:
        return self._sent or (self._handed_over and not self._connecting)


_progress: ContextVar[SendProgress | None] = ContextVar("mailer_send_progress", default=None)


def current_progress() -> SendProgress:
    """The progress of the send running in this task (a throwaway one outside :func:`bounded_send`).

    A context variable, because the transports that report it (aiohttp trace callbacks deep
    inside aiobotocore) are called from our task but not by our code.
    """
    return _progress.get() or SendProgress()


def deadline_error(vendor: str, timeout_s: float, progress: SendProgress) -> TransientVendorError:
    at = f" at {progress.stage}" if progress.stage else ""
    bound = f"timeout_s={timeout_s:g} s bounds the whole send"
    if progress.may_have_reached_vendor:
        return TransientVendorError(
            vendor,
            f"timed out{at} ({bound}) after sending: the vendor may have accepted the mail",
            ambiguous=True,
        )
    return TransientVendorError(vendor, f"timed out{at} ({bound}): the request was not sent", ambiguous=False)


async def bounded_send(
    vendor: str, timeout_s: float, redactor: Redactor, send: Callable[[SendProgress], Awaitable[T]]
) -> T:
    """Run one send's network part under ``timeout_s`` as a deadline for all of it.

    Client libraries time each read (httpx, aiohttp, aiosmtplib), so a vendor trickling a byte
    a second would hold a send, the consumer's job and its lease for as long as it liked and
    the breaker would never open. Every error leaving here has the adapter's secrets blanked.
    """
    progress = SendProgress()
    token = _progress.set(progress)
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            return await send(progress)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise redactor.error(deadline_error(vendor, timeout_s, progress)) from None
    except VendorError as exc:
        redactor.error(exc)
        raise
    finally:
        _progress.reset(token)
