"""The e-mail model (what applications send) and the stored record (what MongoDB holds).

Validation happens here, at the edge, so that nothing malformed is ever stored or queued
and every vendor adapter can trust what it is given: addresses are syntax-checked (no DNS),
header-bound fields cannot carry CR/LF (header injection), and the total size is capped.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
import math
import re
from email.headerregistry import Address as HeaderAddress
from email.utils import getaddresses
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from mailer.errors import EmailValidationError

MAX_EMAIL_BYTES = 10 * 1024 * 1024
# The lowest common per-message recipient limit of the supported vendors (SES: 50), so a
# mail accepted here can go out through any of them during failover.
MAX_RECIPIENTS = 50
MAX_DELAY_S = 2**32 - 1
_CRLF = re.compile(r"[\r\n]")
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")
_TAG = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_META_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
# Headers our own fields (or the MIME machinery) own; setting them by hand would either
# conflict with the field or let a caller smuggle recipients past validation.
RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "reply-to",
        "sender",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "return-path",
        "x-mailer-id",
        "x-mailer-metadata",
    }
)
MAIL_ID_HEADER = "X-Mailer-Id"


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# The common case, checked without email-validator: a dot-atom ASCII local part at an ASCII
# domain with an alphabetic TLD. Anything else (quoted local parts, IDN, punycode, special-use
# names, odd lengths) goes to email-validator, so both paths accept the same addresses.
_FAST_EMAIL = re.compile(rf"({_ATEXT}(?:\.{_ATEXT})*)@((?:{_LABEL}\.)+([A-Za-z]{{2,63}}))")
_PLAIN = re.compile(r"[^\s<>,;:\"()\[\]\\]+")
_NAMED = re.compile(r"([^<>,;:\"()\[\]\\@.]*?)\s*<([^<>\s]+)>")
_SPECIAL_TLDS = frozenset(SPECIAL_USE_DOMAIN_NAMES)


@functools.lru_cache(maxsize=8192)
def normalize_email(value: str) -> str:
    """The normalized form of one address (syntax only, no DNS); ValueError when invalid.

    Cached: the same senders and recipients come back mail after mail.
    """
    m = _FAST_EMAIL.fullmatch(value)
    if (
        m is not None
        and len(m.group(1)) <= 64
        and len(value) <= 254
        and "--" not in m.group(2)
        and m.group(3).lower() not in _SPECIAL_TLDS
    ):
        return f"{m.group(1)}@{m.group(2).lower()}"
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"invalid address {value[:80]!r}: {exc}") from None


def _split_address(value: str) -> tuple[str, str]:
    """``(name, addr)`` of one address string; the stdlib parser only for unusual forms."""
    text = value.strip()
    if _PLAIN.fullmatch(text):
        return "", text
    m = _NAMED.fullmatch(text)
    if m is not None:
        return " ".join(m.group(1).split()), m.group(2)
    pairs = getaddresses([value])
    # The parser is lenient: it joins 'a@exa mple.com' into 'a@example.com'. An
    # address it did not find verbatim would be a silently different recipient.
    if len(pairs) != 1 or not pairs[0][1] or pairs[0][1] not in value:
        raise ValueError(f"not one e-mail address: {value[:80]!r}")
    return pairs[0]


def _field_error(field: str, message: str) -> ValidationError:
    """A whole-mail check's error located at ``field``, so callers can map it to a form."""
    return ValidationError.from_exception_data(
        "Email",
        [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(field,), input=None)],
    )


def _no_crlf(value: str, what: str) -> str:
    if _CRLF.search(value):
        raise ValueError(f"{what} must not contain CR or LF (header injection)")
    return value


class Address(BaseModel):
    """One mailbox: ``email`` plus an optional display ``name``.

    Accepts ``"a@example.com"``, ``"Ann <a@example.com>"`` or ``{"email": ..., "name": ...}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    email: str
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, str):
            _no_crlf(value, "an address")
            name, addr = _split_address(value)
            return {"email": addr, "name": name or None}
        return value

    @field_validator("email")
    @classmethod
    def _check_email(cls, value: str, info: ValidationInfo) -> str:
        _no_crlf(value, "an address")
        if isinstance(info.context, dict) and info.context.get("trusted"):
            return value  # validated when the mail was accepted (Email.from_stored)
        return normalize_email(value)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _no_crlf(value, "a display name")
        if len(value) > 200:
            raise ValueError("display name longer than 200 characters")
        return value or None

    def __str__(self) -> str:
        """RFC 5322 form with the display name quoted where needed (Unicode kept as is;
        the transport encodes it, RFC 2047 or SMTPUTF8)."""
        return str(HeaderAddress(display_name=self.name or "", addr_spec=self.email))


def _as_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, (str, dict, Address)):
        return [value]
    return value


AddressList = Annotated[list[Address], BeforeValidator(_as_list)]


class Attachment(BaseModel):
    """A file sent with the mail. In JSON (and as a ``str`` in Python) ``content`` is base64."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field("application/octet-stream", pattern=r"^[\w.+-]+/[\w.+-]+$")
    content: bytes

    @field_validator("filename")
    @classmethod
    def _check_filename(cls, value: str) -> str:
        _no_crlf(value, "filename")
        if any(c in value for c in '/\\"\x00'):
            raise ValueError('filename must not contain / \\ " or NUL')
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _decode(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                # Standard or URL-safe alphabet: pydantic's own JSON output (ser_json_bytes=
                # "base64") is URL-safe, and a mail's JSON must parse back.
                return base64.b64decode(value, altchars=b"-_", validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("content given as text must be base64") from None
        return value


MetaValue = str | int | float | bool | None


class Email(BaseModel):
    """What an application asks us to send. ``from`` is spelled ``from_`` in Python."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: Address = Field(alias="from")
    to: AddressList = Field(min_length=1)
    cc: AddressList = Field(default_factory=list)
    bcc: AddressList = Field(default_factory=list)
    reply_to: AddressList = Field(default_factory=list)
    subject: str = Field(min_length=1, max_length=998)
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list, max_length=10)
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=50)
    attachments: list[Attachment] = Field(default_factory=list, max_length=100)
    priority: int | None = Field(None, ge=0, le=2**32 - 1, strict=True)
    send_at: dt.datetime | None = None
    delay: float | None = Field(None, ge=0, le=MAX_DELAY_S)
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)

    @field_validator("subject")
    @classmethod
    def _check_subject(cls, value: str) -> str:
        return _no_crlf(value, "subject")

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 50:
            raise ValueError("at most 50 custom headers")
        for name, val in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {name[:40]!r} is not a valid field name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by mailer; use the matching field instead")
            _no_crlf(val, f"header {name!r}")
            if len(val) > 998:
                raise ValueError(f"header {name!r} is longer than 998 characters")
        return value

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not _TAG.match(tag):
                raise ValueError(f"tag {tag[:40]!r}: use 1-64 ASCII letters, digits, '_' or '-'")
        return value

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, val in value.items():
            if not (val is None or isinstance(val, (str, int, float, bool))):
                raise ValueError(f"metadata value of {key[:40]!r} must be a string, number, boolean or null")
            if not _META_KEY.match(key):
                raise ValueError(f"metadata key {key[:40]!r}: use up to 64 letters, digits, '_' or '-'")
            if isinstance(val, str) and len(val) > 1000:
                raise ValueError(f"metadata value of {key!r} is longer than 1000 characters")
            if isinstance(val, int) and not -(2**63) <= val < 2**63:  # MongoDB's widest integer
                raise ValueError(f"metadata value of {key[:40]!r} does not fit in 64 bits")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():
            raise ValueError("idempotency_key must be printable text")
        return value

    @field_validator("send_at")
    @classmethod
    def _check_send_at(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("send_at must include a timezone (e.g. 2026-01-01T09:00:00Z)")
        # BSON datetimes hold milliseconds: truncate so the stored mail reads back equal.
        return value.replace(microsecond=value.microsecond // 1000 * 1000)

    @model_validator(mode="after")
    def _check_whole(self, info: ValidationInfo) -> Self:
        if not (self.text or self.html):
            raise _field_error("text", "give 'text' and/or 'html': a mail needs a body")
        if self.send_at is not None and self.delay is not None:
            raise _field_error("delay", "give either 'send_at' or 'delay', not both")
        n = len(self.to) + len(self.cc) + len(self.bcc)
        ctx = info.context if isinstance(info.context, dict) else {}
        if n > ctx.get("max_recipients", MAX_RECIPIENTS):
            limit_n = ctx.get("max_recipients", MAX_RECIPIENTS)
            raise _field_error("to", f"{n} recipients in to/cc/bcc; at most {limit_n} per mail")
        limit = ctx.get("max_bytes", MAX_EMAIL_BYTES)
        parts = self._sizes()
        if sum(parts.values()) > limit:
            biggest = max(parts, key=lambda k: parts[k])
            raise _field_error(
                biggest, f"the mail is about {sum(parts.values())} bytes; the limit is {limit} bytes"
            )
        return self

    def _sizes(self) -> dict[str, int]:
        return {
            "subject": len(self.subject.encode()),
            "text": len((self.text or "").encode()),
            "html": len((self.html or "").encode()),
            "headers": sum(len(k) + len(v.encode()) for k, v in self.headers.items()),
            "attachments": sum((len(a.content) + 2) // 3 * 4 for a in self.attachments),
        }

    def size(self) -> int:
        """Approximate encoded size: bodies plus attachments as base64 (how they travel)."""
        return sum(self._sizes().values())

    def delay_seconds(self, now: dt.datetime | None = None) -> int:
        """beanstalkd delay for this mail (whole seconds, never negative)."""
        if self.delay is not None:
            return math.ceil(self.delay)  # never earlier than asked
        if self.send_at is not None:
            now = now or dt.datetime.now(dt.UTC)
            return max(0, min(MAX_DELAY_S, int((self.send_at - now).total_seconds() + 0.999)))
        return 0

    def recipients(self) -> list[Address]:
        return [*self.to, *self.cc, *self.bcc]

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> Email:
        """Rebuild a stored mail. Limits were enforced when it was accepted (and may have
        changed since), so only the shape is checked again; a corrupted document raises."""
        return cls.model_validate(
            data, context={"max_bytes": 1 << 62, "max_recipients": 1 << 30, "trusted": True}
        )


def _field_name(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("function-after[_check_whole()]",):
            continue
        else:
            parts.append(("." if parts else "") + ("from" if p == "from_" else str(p)))
    return "".join(parts) or "(mail)"


BAD_TEXT = "not valid UTF-8 text (undecodable bytes or a lone surrogate)"


def _bad_text(data: Any, loc: tuple[int | str, ...] = ()) -> list[str]:
    """Fields whose strings are not valid Unicode: lone surrogates (undecodable bytes smuggled
    into a str, or JSON ``\\ud800`` escapes), which neither MongoDB nor any vendor accepts."""
    found: list[str] = []
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            found.append(_field_name(loc))
    elif isinstance(data, dict):
        for key, value in data.items():
            found += _bad_text(key, (*loc, "(key)")) if isinstance(key, str) else []
            found += _bad_text(value, (*loc, key if isinstance(key, str | int) else repr(key)))
    elif isinstance(data, list | tuple):
        for i, value in enumerate(data):
            found += _bad_text(value, (*loc, i))
    return found


def _bad_json_text(data: str | bytes) -> list[str]:
    """For JSON the parser refused: the fields holding invalid UTF-8 or lone surrogates, if
    that is why (a lenient parse keeps them as surrogates, so they can be found)."""
    try:
        text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
        return _bad_text(json.loads(text))
    except (ValueError, RecursionError):
        return []


def parse_email(
    data: Email | dict[str, Any] | str | bytes,
    *,
    max_bytes: int = MAX_EMAIL_BYTES,
    max_recipients: int = MAX_RECIPIENTS,
) -> Email:
    """Validate untrusted input (a dict, a JSON document or an Email) into an Email.

    Raises EmailValidationError naming each wrong field; never a bare pydantic error.
    """
    ctx = {"max_bytes": max_bytes, "max_recipients": max_recipients}
    try:
        if isinstance(data, Email):
            data = data.model_dump(by_alias=True)
        if isinstance(data, (str, bytes)):
            return Email.model_validate_json(data, context=ctx)
        if not isinstance(data, dict):
            raise EmailValidationError(
                [("(mail)", f"expected a mapping of fields, got {type(data).__name__}")]
            )
        if bad := _bad_text(data):
            raise EmailValidationError([(field, BAD_TEXT) for field in bad])
        return Email.model_validate(data, context=ctx)
    except ValidationError as exc:
        raw = exc.errors(include_url=False, include_input=False)
        json_only = all(e["type"] == "json_invalid" for e in raw)
        if isinstance(data, str | bytes) and json_only and (bad := _bad_json_text(data)):
            raise EmailValidationError([(field, BAD_TEXT) for field in bad]) from None
        errors = []
        for err in exc.errors(include_url=False, include_input=False):
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            errors.append((_field_name(tuple(err["loc"])), msg))
        raise EmailValidationError(errors) from None


class Status(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    RETRYING = "retrying"
    SENT = "sent"
    FAILED = "failed"


Outcome = Literal["sent", "transient", "permanent", "auth", "unknown", "unavailable"]


class Attempt(BaseModel):
    """One try at one vendor, as recorded on the mail."""

    model_config = ConfigDict(extra="ignore")

    vendor: str
    started_at: dt.datetime
    finished_at: dt.datetime
    outcome: Outcome
    error: str | None = None
    message_id: str | None = None
    job_id: int | None = None
    consumer: str | None = None


class MailRecord(BaseModel):
    """A stored mail as callers see it (``Producer.status``, ``mailer status``)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: Status
    email: Email
    created_at: dt.datetime
    updated_at: dt.datetime
    job_id: int | None = None
    rounds: int = 0
    attempts: list[Attempt] = Field(default_factory=list)
    vendor: str | None = None
    message_id: str | None = None
    sent_at: dt.datetime | None = None
    error: str | None = None
    idempotency_key: str | None = None
