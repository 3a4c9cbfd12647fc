"""One MIME rendering of an :class:`~mailer.models.Email`, shared by every adapter that needs bytes.

SMTP always needs a full message and SES needs one whenever its ``Simple`` content cannot
express the mail, so both go through here: a recipient sees the same structure, headers and
encodings whichever of them delivered it, which keeps duplicates after an ambiguous failover
recognisable.

Bodies and attachments are always 7-bit transfer-encoded (quoted-printable or base64):
relays without 8BITMIME still exist, and SES's raw path and moto both expect ASCII-safe bytes.
Headers are RFC 2047 encoded unless ``utf8=True`` (only for SMTPUTF8 sessions, which are the
only way to carry a non-ASCII local part). Bcc is never written into the headers: the
transport's envelope carries those recipients.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from email import policy as email_policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from mailer.models import MAIL_ID_HEADER, Address, Email

__all__ = [
    "ascii_addr_spec",
    "build_message",
    "envelope_addr_spec",
    "make_message_id",
    "message_bytes",
    "needs_smtputf8",
]

# cte_type="7bit" forces quoted-printable/base64 bodies even where 8bit would be shorter.
_ASCII_POLICY = email_policy.SMTP.clone(cte_type="7bit")
_UTF8_POLICY = email_policy.SMTPUTF8.clone(cte_type="7bit")

# These types may not be base64-encoded (RFC 2046 5.2.1 / 5.1.1), and we only have opaque
# bytes, so they travel as generic binary; the filename still tells the reader what it is.
_OPAQUE_MAINTYPES = frozenset({"message", "multipart"})


def needs_smtputf8(email: Email) -> bool:
    """True when some mailbox has a non-ASCII local part: no 7-bit encoding can carry it."""
    return any(not a.email.rpartition("@")[0].isascii() for a in _all_addresses(email))


def _all_addresses(email: Email) -> Iterable[Address]:
    yield email.from_
    yield from email.to
    yield from email.cc
    yield from email.bcc
    yield from email.reply_to


def _idna_domain(domain: str) -> str:
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"domain {domain!r} cannot be converted to ASCII (IDNA): {exc}") from None


def ascii_addr_spec(addr: str) -> str:
    """``local@domain`` with the domain in punycode, for transports that are 7-bit only.

    Raises ValueError for a non-ASCII local part, which has no ASCII form at all.
    """
    local, _, domain = addr.rpartition("@")
    if not local.isascii():
        raise ValueError(f"the address {addr!r} has a non-ASCII local part, which needs SMTPUTF8")
    return f"{local}@{_idna_domain(domain)}"


def envelope_addr_spec(addr: str, *, utf8: bool) -> str:
    """The address as it goes on MAIL FROM / RCPT TO (Unicode only in an SMTPUTF8 session)."""
    return addr if utf8 else ascii_addr_spec(addr)


def _header_address(addr: Address, *, utf8: bool) -> HeaderAddress:
    spec = envelope_addr_spec(addr.email, utf8=utf8)
    local, _, domain = spec.rpartition("@")
    return HeaderAddress(display_name=addr.name or "", username=local, domain=domain)


def make_message_id(email: Email) -> str:
    """A fresh ``<...@sender-domain>`` id; the sender's domain avoids leaking our hostname."""
    domain = _idna_domain(email.from_.email.rpartition("@")[2])
    return make_msgid(domain=domain)


def build_message(
    email: Email,
    mail_id: str,
    *,
    message_id: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
    utf8: bool = False,
    now: dt.datetime | None = None,
) -> EmailMessage:
    """Render the mail; ``extra_headers`` lets an adapter add its own (e.g. metadata it cannot tag).

    Raises ValueError when the mail cannot be expressed (e.g. a non-ASCII local part without
    ``utf8``); adapters turn that into a permanent failure because no retry can fix it.
    """
    pol = _UTF8_POLICY if utf8 else _ASCII_POLICY
    msg = EmailMessage(policy=pol)
    msg["From"] = _header_address(email.from_, utf8=utf8)
    msg["To"] = [_header_address(a, utf8=utf8) for a in email.to]
    if email.cc:
        msg["Cc"] = [_header_address(a, utf8=utf8) for a in email.cc]
    if email.reply_to:
        msg["Reply-To"] = [_header_address(a, utf8=utf8) for a in email.reply_to]
    msg["Subject"] = email.subject
    msg["Date"] = format_datetime(now or dt.datetime.now(dt.UTC))
    msg["Message-ID"] = message_id or make_message_id(email)
    msg[MAIL_ID_HEADER] = mail_id

    if email.text is not None and email.html is not None:
        msg.set_content(email.text)
        msg.add_alternative(email.html, subtype="html")
    elif email.html is not None:
        msg.set_content(email.html, subtype="html")
    else:
        msg.set_content(email.text or "")

    for att in email.attachments:
        maintype, _, subtype = att.content_type.partition("/")
        if maintype.lower() in _OPAQUE_MAINTYPES:
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(att.content, maintype=maintype, subtype=subtype, filename=att.filename)

    # Custom headers go last: set_content()/add_attachment() move or clear Content-* headers,
    # so anything set earlier could end up inside a body part.
    for name, value in (*email.headers.items(), *(extra_headers or {}).items()):
        msg[name] = value
    return msg


def message_bytes(msg: EmailMessage) -> bytes:
    """Wire form with CRLF line ends, as SMTP DATA and SES ``Raw`` expect."""
    return msg.as_bytes(policy=msg.policy)
