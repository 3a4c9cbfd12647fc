"""One MIME rendering of an :class:`~mailer.models.Email`, shared by every adapter that needs bytes.

SMTP always needs a full message and SES needs one whenever its ``Simple`` content cannot
express the mail, so both go through here: a recipient sees the same structure, headers and
encodings whichever of them delivered it, which keeps duplicates after an ambiguous failover
recognisable.

Bodies and attachments are always 7-bit transfer-encoded (quoted-printable or base64):
relays without 8BITMIME still exist, and SES's raw path and moto both expect ASCII-safe bytes.
Headers are always RFC 2047 encoded and folded by the 7-bit policy, also with ``utf8=True``
(SMTPUTF8 sessions, the only way to carry a non-ASCII local part): the stdlib's SMTPUTF8
folding mixes raw UTF-8 with encoded words and loses or doubles spaces, and can fold a long
display name into an empty line, which ends the header section. Instead each non-ASCII local
part is written as an ASCII placeholder and put back, as raw UTF-8, into the serialised header
section only (:func:`message_bytes`). Bcc is never written into the headers: the transport's
envelope carries those recipients.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import secrets
from collections.abc import Iterable, Mapping
from email import policy as email_policy
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from email_validator import EmailNotValidError, validate_email

from mailer.capabilities import smtputf8_field
from mailer.models import MAIL_ID_HEADER, METADATA_HEADER, Address, Email, body_encoding, metadata_json

__all__ = [
    "ascii_addr_spec",
    "build_message",
    "envelope_addr_spec",
    "make_message_id",
    "message_bytes",
    "metadata_headers",
    "needs_smtputf8",
]

# cte_type="7bit" forces quoted-printable/base64 bodies even where 8bit would be shorter.
# Inside one folded header, a line that is empty or only whitespace.
_BLANK_FOLD = re.compile(rb"\r\n[ \t]*(?=\r\n)")
_BLANK_FOLD_STR = re.compile(r"\r?\n[ \t]*(?=\r?\n)")


class _SevenBitPolicy(email_policy.EmailPolicy):
    """The SMTP policy, minus a stdlib (3.11) folding bug: after an address that fills its
    line, a display name too long for any line is preceded by an empty line, and an empty
    line ends the header section: Subject and the rest would become body text."""

    def fold_binary(self, name: str, value: str) -> bytes:
        return _BLANK_FOLD.sub(b"", super().fold_binary(name, value))

    def fold(self, name: str, value: str) -> str:
        return _BLANK_FOLD_STR.sub("", super().fold(name, value))


class _EncodedWords(str):
    """A non-ASCII unstructured header value, folded as RFC 2047 words by the long-standing
    ``email.header`` encoder instead of the policy's folder, which (3.11) drops a space that
    sits between an encoded word and plain text. The policy keeps a value with a matching
    ``name`` as it is and calls its ``fold`` (``EmailPolicy.header_store_parse``)."""

    name: str

    def __new__(cls, name: str, value: str) -> _EncodedWords:
        self = super().__new__(cls, value)
        self.name = name
        return self

    def fold(self, *, policy: email_policy.Policy) -> str:
        words = Header(str(self), "utf-8", header_name=self.name).encode(linesep=policy.linesep)
        return f"{self.name}: {words}{policy.linesep}"


def _unstructured(name: str, value: str) -> str:
    return value if value.isascii() else _EncodedWords(name, value)


_ASCII_POLICY = _SevenBitPolicy(linesep="\r\n", cte_type="7bit")


class _Message(EmailMessage):
    """An EmailMessage that knows which placeholders stand for raw UTF-8 local parts."""

    utf8_local_parts: dict[bytes, bytes] = {}  # replaced per message, never mutated


# These types may not be base64-encoded (RFC 2046 5.2.1 / 5.1.1), and we only have opaque
# bytes, so they travel as generic binary; the filename still tells the reader what it is.
_OPAQUE_MAINTYPES = frozenset({"message", "multipart"})


def needs_smtputf8(email: Email) -> bool:
    """True when some mailbox has a non-ASCII local part: no 7-bit encoding can carry it.
    The rule itself lives in :mod:`mailer.capabilities`, where SES's limit is declared."""
    return smtputf8_field(email) is not None


@functools.lru_cache(maxsize=1024)
def _idna_domain(domain: str) -> str:
    """The domain's ASCII (punycode) form, as email-validator computed it when the model
    accepted the address: IDNA 2008 / UTS 46. Python's own "idna" codec is IDNA 2003, which
    maps ``faß.de`` to ``fass.de``, a different domain, and refuses some valid labels."""
    if domain.isascii():
        return domain
    try:
        return validate_email(f"a@{domain}", check_deliverability=False).ascii_domain
    except EmailNotValidError as exc:  # not reached for a validated mail
        raise ValueError(f"domain {domain!r} has no ASCII (IDNA) form: {exc}") from None


def metadata_headers(metadata: Mapping[str, object]) -> dict[str, str]:
    """The ``X-Mailer-Metadata`` header for adapters that carry metadata as a header (SMTP,
    SES raw, Brevo): one encoding everywhere, so a recipient's filters see the same JSON."""
    return {METADATA_HEADER: metadata_json(dict(metadata))} if metadata else {}


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


def _header_address(addr: Address, *, utf8: bool, placeholders: dict[bytes, bytes]) -> HeaderAddress:
    local, _, domain = addr.email.rpartition("@")
    if not local.isascii():
        if not utf8:
            raise ValueError(f"the address {addr.email!r} has a non-ASCII local part, which needs SMTPUTF8")
        token = f"mailer-utf8-{secrets.token_hex(8)}-{len(placeholders)}"
        placeholders[token.encode()] = local.encode()
        local = token
    return HeaderAddress(display_name=addr.name or "", username=local, domain=_idna_domain(domain))


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
    msg = _Message(policy=_ASCII_POLICY)
    placeholders: dict[bytes, bytes] = {}
    msg.utf8_local_parts = placeholders

    def header(addresses: Iterable[Address]) -> list[HeaderAddress]:
        return [_header_address(a, utf8=utf8, placeholders=placeholders) for a in addresses]

    msg["From"] = header([email.from_])
    msg["To"] = header(email.to)
    if email.cc:
        msg["Cc"] = header(email.cc)
    if email.reply_to:
        msg["Reply-To"] = header(email.reply_to)
    msg["Subject"] = _unstructured("Subject", email.subject)
    msg["Date"] = format_datetime(now or dt.datetime.now(dt.UTC))
    msg["Message-ID"] = message_id or make_message_id(email)
    msg[MAIL_ID_HEADER] = mail_id

    # The transfer encodings the model's size cap counted (models.body_encoding).
    if email.text is not None and email.html is not None:
        msg.set_content(email.text, cte=body_encoding(email.text)[0])
        msg.add_alternative(email.html, subtype="html", cte=body_encoding(email.html)[0])
    elif email.html is not None:
        msg.set_content(email.html, subtype="html", cte=body_encoding(email.html)[0])
    else:
        text = email.text or ""
        msg.set_content(text, cte=body_encoding(text)[0])

    for att in email.attachments:
        maintype, _, subtype = att.content_type.partition("/")
        if maintype.lower() in _OPAQUE_MAINTYPES:
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(att.content, maintype=maintype, subtype=subtype, filename=att.filename)

    # Custom headers go last: set_content()/add_attachment() move or clear Content-* headers,
    # so anything set earlier could end up inside a body part.
    for name, value in (*email.headers.items(), *(extra_headers or {}).items()):
        msg[name] = _unstructured(name, value)
    return msg


def message_bytes(msg: EmailMessage) -> bytes:
    """Wire form with CRLF line ends, as SMTP DATA and SES ``Raw`` expect; raw UTF-8 local
    parts (SMTPUTF8) go back in place of their placeholders, in the header section only."""
    raw = msg.as_bytes(policy=msg.policy)
    placeholders = msg.utf8_local_parts if isinstance(msg, _Message) else {}
    if not placeholders:
        return raw
    head, sep, body = raw.partition(b"\r\n\r\n")
    for token, local in placeholders.items():
        head = head.replace(token, local)
    return head + sep + body
