"""SMTP adapter over aiosmtplib, for a relay of our own or any provider's SMTP endpoint.

Connections are pooled, not opened per mail: a handshake with STARTTLS and AUTH costs
several round trips, more than the transaction itself. The pool is small (``max_connections``,
default 4) rather than one connection behind a lock, because the consumer sends many mails
concurrently and one SMTP session can only carry one transaction at a time; relays also
limit connections per client, so it stays well under their usual limits. Connections open
lazily on the first send, so ``connect()`` does not fail just because the relay is briefly
down at start-up (the router learns that from the first send, like for any vendor).

A pooled connection may have been closed by the server while idle; that shows up on the
first command (MAIL FROM), before any message data left, so the send is retried once on a
fresh connection. Connections idle for longer than ``_MAX_IDLE_S`` are not reused at all,
staying clear of the usual server idle timeouts (RFC 5321 suggests 5 minutes).

Recipients: a 4xx for any recipient aborts the transaction (RSET) as transient, because the
mail can be retried elsewhere in full without duplicating anything; 5xx for only some of
them lets the mail go to the others (as a vendor API would, bouncing the bad ones later);
5xx for all of them is permanent.

Deadline: aiosmtplib's timeout is per command, so a relay trickling its replies could hold a send
indefinitely; once a pool slot is held, the connection set-up and the transaction run under one
deadline of ``timeout_s`` (:func:`~mailer.vendors.base.bounded_send`). The wait for a slot is
outside it: that queue is ours, and a busy pool is not the relay's failure. Only from DATA on
can the relay have taken the mail, so only a deadline there is ambiguous.

Secrets: replies are the relay's words, and a relay may quote the AUTH exchange; every error and
the partial-refusal warning pass through the adapter's :class:`~mailer.redact.Redactor`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from mailer.config import SmtpSettings
from mailer.errors import (
    PermanentVendorError,
    TransientVendorError,
    UnsupportedByVendor,
    VendorAuthError,
    VendorConfigError,
    VendorError,
    VendorThrottled,
)
from mailer.lifecycle import AsyncResource
from mailer.models import Email
from mailer.redact import Redactor
from mailer.vendors.base import SendProgress, SendResult, bounded_send, current_progress
from mailer.vendors.mime import (
    build_message,
    envelope_addr_spec,
    make_message_id,
    message_bytes,
    metadata_headers,
    needs_smtputf8,
)

__all__ = ["SmtpVendor"]

log = logging.getLogger(__name__)

_MAX_IDLE_S = 60.0
# Reply codes that mean "authenticate first" / "credentials refused", whatever the command.
_AUTH_CODES = frozenset({530, 534, 535, 538})
_SERVICE_CLOSING = 421
# A 421/451 whose text speaks of a rate is the relay asking us to slow down, not an outage
# (Postfix "421 4.7.0 Error: too many connections", Exchange "451 4.7.500 Server busy... rate").
_THROTTLE_CODES = frozenset({421, 451})
_RATE_TEXT = re.compile(r"\brate\b|rate.?limit|too many|throttl", re.IGNORECASE)
# Postfix, Exim, Sendmail and most relays name their queue id in the reply to DATA.
_QUEUED_AS = re.compile(r"queued as\s+<?([^\s<>]+?)>?(?:\s|$)", re.IGNORECASE)
_MAX_REASON = 300


@dataclass(eq=False)
class _Conn:
    smtp: aiosmtplib.SMTP
    generation: int
    last_used: float
    uses: int = 0


class _StaleConnection(Exception):
    """A pooled connection turned out dead before any message data was sent."""


def _reason(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


class SmtpVendor(AsyncResource):
    """Delivers through one SMTP server; create once and share, it pools its own connections."""

    def __init__(self, settings: SmtpSettings, name: str = "smtp", *, max_connections: int = 4) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if settings.password is not None and not settings.username:
            raise VendorConfigError(f"vendor {name!r}: a password is set but no username")
        self.name = name
        self._settings = settings
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self._generation = 0
        self._local_hostname: str | None = None
        self._tls: ssl.SSLContext | None = None
        self._redactor = Redactor((settings.password,), users=(settings.username or "",))

    def __repr__(self) -> str:
        s = self._settings
        user = f", username={s.username!r}" if s.username else ""
        return f"SmtpVendor(name={self.name!r}, host={s.host!r}, port={s.port}{user})"

    async def connect(self) -> None:
        """Resolve our EHLO name and build the TLS context once; sockets open lazily (see the
        module docstring).

        One context for every connection: aiosmtplib would otherwise build one per connection
        (loading the whole CA store, tens of ms of CPU) inside that send's deadline.
        """
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        s = self._settings
        if self._tls is None and (s.use_tls or s.starttls):
            try:
                self._tls = await asyncio.to_thread(ssl.create_default_context, cafile=s.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise VendorConfigError(
                    f"vendor {self.name!r}: cannot load ca_file {s.ca_file!r} ({exc}): give a PEM "
                    "file of CA certificates, or leave ca_file out to trust the system's"
                ) from None

    async def close(self) -> None:
        """QUIT idle connections; connections busy right now are closed when their send ends."""
        self._generation += 1
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._quit(conn.smtp)

    async def send(self, email: Email, mail_id: str) -> SendResult:
        utf8 = needs_smtputf8(email)
        message_id = make_message_id(email)
        try:
            # Metadata rides in X-Mailer-Metadata, as on SES raw and Brevo: SMTP has no other place.
            extra = metadata_headers(email.metadata)
            msg = build_message(email, mail_id, message_id=message_id, extra_headers=extra, utf8=utf8)
            data = message_bytes(msg)
            sender = envelope_addr_spec(email.from_.email, utf8=utf8)
            recipients = list(
                dict.fromkeys(envelope_addr_spec(a.email, utf8=utf8) for a in email.recipients())
            )
        except ValueError as exc:
            raise PermanentVendorError(self.name, f"cannot build the message: {exc}") from None

        async def deliver(progress: SendProgress) -> SMTPResponse:
            return await self._deliver(sender, recipients, data, utf8)

        async with self._slots:
            reply = await bounded_send(self.name, self._settings.timeout_s, self._redactor, deliver)
        match = _QUEUED_AS.search(reply.message)
        return SendResult(message_id=match.group(1) if match else message_id)

    async def _deliver(self, sender: str, recipients: list[str], data: bytes, utf8: bool) -> SMTPResponse:
        """One transaction on a pooled connection, retried once on a fresh one if it was stale."""
        conn = await self._checkout()
        try:
            reply = await self._transaction(conn, sender, recipients, data, utf8)
        except _StaleConnection:
            conn.smtp.close()
            conn = await self._open()
            try:
                reply = await self._transaction(conn, sender, recipients, data, utf8)
            except BaseException as exc:
                await self._after_error(conn, exc)
                raise
        except BaseException as exc:
            await self._after_error(conn, exc)
            raise
        self._checkin(conn)
        return reply

    # --- pool ----------------------------------------------------------------------------

    async def _checkout(self) -> _Conn:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.smtp.is_connected and now - conn.last_used <= _MAX_IDLE_S:
                return conn
            conn.smtp.close()
        return await self._open()

    def _checkin(self, conn: _Conn) -> None:
        if conn.generation != self._generation or not conn.smtp.is_connected:
            conn.smtp.close()
            return
        conn.uses += 1
        conn.last_used = time.monotonic()
        self._idle.append(conn)

    async def _after_error(self, conn: _Conn, exc: BaseException) -> None:
        """Keep the connection only when the server answered cleanly (a refusal), after RSET."""
        if isinstance(exc, VendorError) and conn.smtp.is_connected:
            try:
                await conn.smtp.rset()
            except (SMTPException, OSError):
                conn.smtp.close()
            else:
                self._checkin(conn)
                return
        conn.smtp.close()

    async def _open(self) -> _Conn:
        await self.connect()
        current_progress().stage = "connect"
        s = self._settings
        smtp = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            username=s.username or None,
            password=s.password.get_secret_value() if s.password is not None else None,
            use_tls=s.use_tls,
            start_tls=s.starttls and not s.use_tls,
            tls_context=self._tls,
            timeout=s.timeout_s,
            local_hostname=self._local_hostname,
        )
        try:
            await smtp.connect()
        except BaseException as exc:
            smtp.close()
            if isinstance(exc, Exception):
                raise self._error(exc, "connect") from exc
            raise
        return _Conn(smtp=smtp, generation=self._generation, last_used=time.monotonic())

    async def _quit(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            if smtp.is_connected:
                await smtp.quit()
        except (SMTPException, OSError):
            pass
        finally:
            smtp.close()

    # --- transaction ---------------------------------------------------------------------

    async def _transaction(
        self, conn: _Conn, sender: str, recipients: list[str], data: bytes, utf8: bool
    ) -> SMTPResponse:
        smtp = conn.smtp
        encoding = "utf-8" if utf8 else "ascii"
        progress = current_progress()
        stage = progress.stage = "MAIL FROM"
        try:
            options: list[str] = []
            if utf8:
                if smtp.last_ehlo_response is None:
                    await smtp.ehlo()  # aiosmtplib greets lazily; the extensions come with EHLO
                if not smtp.supports_extension("smtputf8"):
                    raise UnsupportedByVendor(
                        self.name,
                        "a mailbox has a non-ASCII local part and the server does not offer SMTPUTF8",
                    )
                options.append("SMTPUTF8")
            await smtp.mail(sender, options=options, encoding=encoding)

            stage = progress.stage = "RCPT TO"
            refused: list[SMTPRecipientRefused] = []
            for rcpt in recipients:
                try:
                    await smtp.rcpt(rcpt, encoding=encoding)
                except SMTPRecipientRefused as exc:
                    if exc.code == _SERVICE_CLOSING or not smtp.is_connected:
                        raise
                    refused.append(exc)
            if refused:
                if len(refused) == len(recipients) or any(r.code < 500 for r in refused):
                    raise SMTPRecipientsRefused(refused)
                log.warning(
                    "%s: %d of %d recipients refused, sending to the others: %s",
                    self.name,
                    len(refused),
                    len(recipients),
                    "; ".join(f"{r.recipient}: {r.code} {self._clean(r.message)}" for r in refused),
                )

            stage = progress.stage = "DATA"
            progress.sent()  # the relay may queue the mail as soon as the data is complete
            return await smtp.data(data)
        except VendorError:
            raise
        except Exception as exc:
            if stage == "MAIL FROM" and conn.uses > 0 and _is_dead(exc):
                raise _StaleConnection from exc
            raise self._error(exc, stage) from exc

    # --- errors --------------------------------------------------------------------------

    def _clean(self, text: str) -> str:
        """A relay's words without our secrets, then trimmed (trimming first could cut a key in half)."""
        return _reason(self._redactor.text(text))

    def _error(self, exc: Exception, stage: str) -> VendorError:
        """Map an aiosmtplib error at ``stage`` ("connect", "MAIL FROM", "RCPT TO", "DATA")."""
        s = self._settings
        where = f"{s.host}:{s.port}"
        if isinstance(exc, SMTPAuthenticationError):
            return VendorAuthError(
                self.name,
                f"{where} refused our login ({exc.code} {self._clean(exc.message)}): check username/password",
            )
        if isinstance(exc, SMTPRecipientsRefused):
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(f"{r.recipient}: {r.code} {self._clean(r.message)}" for r in exc.recipients)
            what = f"{where} refused recipients at RCPT TO: {detail}"
            if any(c in _AUTH_CODES for c in codes):
                return VendorAuthError(self.name, what)
            if any(_is_throttle(r.code, r.message) for r in exc.recipients):
                return VendorThrottled(self.name, what)
            if any(c < 500 for c in codes):
                return TransientVendorError(self.name, what)
            return PermanentVendorError(self.name, what)
        if isinstance(exc, SMTPResponseException):
            what = f"{where} answered {exc.code} {self._clean(exc.message)} at {stage}"
            if exc.code in _AUTH_CODES:
                return VendorAuthError(self.name, f"{what}: check the SMTP credentials")
            if _is_throttle(exc.code, exc.message):
                return VendorThrottled(self.name, what)
            if exc.code < 500:
                return TransientVendorError(self.name, what)
            if isinstance(exc, (SMTPConnectResponseError, SMTPHeloError)) or stage == "connect":
                # Refused before any mail was offered: this server will not serve us at all.
                return VendorAuthError(self.name, what)
            return PermanentVendorError(self.name, what)
        if isinstance(exc, SMTPTimeoutError):
            # Once DATA started, the server may have queued the mail before we gave up.
            return TransientVendorError(
                self.name, f"{where} timed out at {stage}: {self._clean(str(exc))}", ambiguous=stage == "DATA"
            )
        if isinstance(exc, SMTPServerDisconnected) and stage != "connect":
            # SMTPServerDisconnected is an OSError too, so this must come before the next test.
            return TransientVendorError(
                self.name, f"{where} closed the connection at {stage}", ambiguous=stage == "DATA"
            )
        if _cert_problem(exc):
            return VendorAuthError(self.name, f"TLS with {where} failed: {self._clean(str(exc))}")
        if isinstance(exc, (SMTPConnectError, SMTPServerDisconnected, OSError)):
            return TransientVendorError(self.name, f"cannot reach {where}: {self._clean(str(exc))}")
        if stage == "connect" and isinstance(exc, SMTPException):
            # STARTTLS or AUTH demanded by our settings but not offered by the server.
            return VendorAuthError(self.name, f"{where}: {self._clean(str(exc))}: check the SMTP settings")
        return TransientVendorError(self.name, f"{where} failed at {stage}: {self._clean(str(exc))}")


def _is_throttle(code: int, message: str) -> bool:
    return code in _THROTTLE_CODES and bool(_RATE_TEXT.search(message))


def _is_dead(exc: BaseException) -> bool:
    if isinstance(exc, SMTPServerDisconnected):
        return True
    return isinstance(exc, SMTPResponseException) and exc.code == _SERVICE_CLOSING


def _cert_problem(exc: BaseException) -> bool:
    """A failed certificate check is a settings problem (wrong host, private CA), not an outage."""
    cause: BaseException | None = exc
    for _ in range(8):  # the chain is short; the bound only guards against a cycle
        if cause is None:
            return False
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
