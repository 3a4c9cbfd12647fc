"""The e-mail model (what applications send) and the stored record (what MongoDB holds).

Validation happens here, at the edge, so that nothing malformed is ever stored or queued
and every vendor adapter can carry what it is given: addresses are syntax-checked (no DNS),
header-bound fields carry no line breaks or control characters (header injection, and the
MIME builder refuses them), and the cap counts the mail's encoded size on the wire.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import json
import math
import re
from email.utils import getaddresses
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from mailer.errors import EmailValidationError

# A default postfix refuses messages over 10,240,000 bytes (message_size_limit) as they
# arrive on the wire; the margin is for the trace and signature headers relays add.
MAX_EMAIL_BYTES = 10_000_000
# The lowest common per-message recipient limit of the supported vendors (SES: 50), so a
# mail accepted here can go out through any of them during failover.
MAX_RECIPIENTS = 50
MAX_DELAY_S = 2**32 - 1
# Every character str.splitlines() breaks on (the MIME builder refuses them all), NUL (a
# real postfix cut "a\x00b" to "a") and the other C0/C1 controls; tab stays allowed.
_HEADER_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# Nothing in a mail nests deeper than this (attachments[0].content); deeper input is refused
# before anything walks it, so no check can hit the recursion limit.
MAX_NESTING = 8
METADATA_HEADER = "X-Mailer-Metadata"
# One header line is at most 998 characters (RFC 5322 2.1.1); the metadata header is
# not folded (its JSON has no whitespace to fold at), so it must fit on one.
MAX_METADATA_JSON = 998 - len(METADATA_HEADER) - 2
MAX_METADATA_KEYS = 50
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")
_TAG = re.compile(r"[A-Za-z0-9_-]{1,64}")
_META_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
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
# Any Content-* header on the top-level message describes the MIME structure we build.
_RESERVED_PREFIXES = ("content-",)
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
# A display name that needs no quotes: atoms (any non-ASCII counts as atext, RFC 6532)
# separated by single spaces.
_UATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
_ATOM_PHRASE = re.compile(rf"{_UATOM}(?: {_UATOM})*")


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


def _header_safe(value: str, what: str) -> str:
    """Refuse what would break a header line anywhere (MIME builder, vendor, relay)."""
    if m := _HEADER_UNSAFE.search(value):
        raise ValueError(
            f"{what} must not contain CR or LF, NUL, another control character or a line "
            f"separator (found {m.group()!r} at position {m.start()}): remove it"
        )
    return value


def metadata_json(metadata: dict[str, Any]) -> str:
    """The metadata as the one ``X-Mailer-Metadata`` header value every adapter writes.

    Compact and ASCII-only (non-ASCII escaped), so the header needs no RFC 2047 encoding
    and reads back as exactly the JSON that was sent.
    """
    return json.dumps(metadata, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _metadata_json_bound(metadata: dict[str, Any]) -> int:
    """At least ``len(metadata_json(metadata))``, of checked metadata (flat values, keys of
    letters, digits, ``_`` and ``-``): a string character is at most 12 characters of ASCII
    JSON (a surrogate pair of ``\\uXXXX``), a 64-bit integer at most 20, a float's repr 24."""
    n = 2
    for key, value in metadata.items():
        n += len(key) + 4  # quotes, colon, comma
        if isinstance(value, str):
            n += 12 * len(value) + 2
        elif isinstance(value, float):
            n += 24
        else:
            n += 20  # int, true, false, null
    return n


def _format_address(name: str, addr_spec: str) -> str:
    """``name <addr>`` with the name quoted where RFC 5322 needs it; never raises.

    The stdlib's Address refuses a non-ASCII local part (NonASCIILocalPartDefect), which
    the model accepts (SMTPUTF8), so the quoting is done here.
    """
    if not name:
        return addr_spec
    if _ATOM_PHRASE.fullmatch(name) is None:
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{addr_spec}>"


def _is_trusted(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get("trusted"))


# Address text -> its validated Address, bounded (cleared whole when full: cheaper than an LRU
# on every hit, and a sender's addresses refill it at once).
_ADDRESS_CACHE: dict[str, Address] = {}
_ADDRESS_CACHE_MAX = 8192


class Address(BaseModel):
    """One mailbox: ``email`` plus an optional display ``name``.

    Accepts ``"a@example.com"``, ``"Ann <a@example.com>"`` or ``{"email": ..., "name": ...}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    email: str
    name: str | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _parse(cls, value: Any, handler: ModelWrapValidatorHandler[Address], info: ValidationInfo) -> Address:
        """An address given as text is validated once and its Address (frozen) shared after:
        the same sender and recipients come back mail after mail."""
        if not isinstance(value, str):
            return handler(value)
        trusted = _is_trusted(info)  # skips normalisation: such an Address is never shared
        if not trusted and (known := _ADDRESS_CACHE.get(value)) is not None:
            return known
        _header_safe(value, "an address")
        name, addr = _split_address(value)
        address = handler({"email": addr, "name": name or None})
        if not trusted:
            if len(_ADDRESS_CACHE) >= _ADDRESS_CACHE_MAX:
                _ADDRESS_CACHE.clear()
            _ADDRESS_CACHE[value] = address
        return address

    @field_validator("email")
    @classmethod
    def _check_email(cls, value: str, info: ValidationInfo) -> str:
        _header_safe(value, "an address")
        if _is_trusted(info):
            return value  # validated when the mail was accepted (Email.from_stored)
        return normalize_email(value)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _header_safe(value, "a display name")
        if len(value) > 200:
            raise ValueError("display name longer than 200 characters")
        return value or None

    def __str__(self) -> str:
        """RFC 5322 form with the display name quoted where needed (Unicode kept as is;
        the transport encodes it, RFC 2047 or SMTPUTF8)."""
        return _format_address(self.name or "", self.email)


# Date, Message-ID, X-Mailer-Id, MIME-Version, the multipart boundaries: generous bounds.
_MESSAGE_OVERHEAD = 400
_PART_OVERHEAD = 200
# Bytes quoted-printable escapes (beyond non-ASCII): '=', and controls other than TAB/CR/LF.
_QP_ESCAPED = re.compile(rb"[=\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_QP_TRAILING_WS = re.compile(rb"[ \t]+(?=\r?\n|\r|$)")
_SEVEN_BIT_UNSAFE = re.compile(rb"[^\t\n\r -~]")


def _base64_size(n: int) -> int:
    """base64 of ``n`` bytes in lines of 76 characters, each ending in CRLF."""
    chars = (n + 2) // 3 * 4
    return chars + 2 * -(-chars // 76)


def body_encoding(text: str) -> tuple[Literal["7bit", "quoted-printable", "base64"], int]:
    """The transfer encoding a body is sent with, and an upper bound of its encoded size.

    The MIME builder uses this same choice, so the size cap counts what is actually sent:
    7bit for short-lined ASCII, else the smaller of quoted-printable and base64.
    """
    data = text.encode()
    n = len(data)
    lines = data.count(b"\n") + data.count(b"\r") + 1
    non_ascii = n - len(data.decode("ascii", "ignore"))
    if (
        not non_ascii
        and not _SEVEN_BIT_UNSAFE.search(data)
        and max(map(len, data.splitlines()), default=0) <= 998
    ):
        return "7bit", n + 2 * lines
    escaped = n + 2 * (non_ascii + len(_QP_ESCAPED.findall(data)))
    escaped += 2 * sum(len(m) for m in _QP_TRAILING_WS.findall(data))
    qp = escaped + 3 * (escaped // 73 + lines) + 2 * lines
    b64 = _base64_size(n + 2 * lines)  # line ends become CRLF before base64
    return ("quoted-printable", qp) if qp <= b64 else ("base64", b64)


def _header_cost(value: str) -> int:
    """Bound of one header value as sent: RFC 2047 words (at most 4/3 of the UTF-8 plus
    their markers) or quoting, folded every 78 characters."""
    return 2 * len(value.encode()) + 16


def _address_cost(addr: Address) -> int:
    # 3x the address covers punycode (an IDN label can grow past its UTF-8 length).
    return _header_cost(addr.name or "") + 3 * len(addr.email.encode()) + 8


def _attachment_cost(att: Attachment) -> int:
    # The filename appears in RFC 2231 percent-encoding (3 bytes per byte) with continuations.
    return (
        _base64_size(len(att.content))
        + 4 * len(att.filename.encode())
        + len(att.content_type)
        + _PART_OVERHEAD
    )


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
    # RFC 6838 restricted names (ASCII, at most 127 characters each side): a type must fit
    # every vendor's field and the MIME header line.
    content_type: str = Field(
        "application/octet-stream",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$",
    )
    content: bytes

    @field_validator("filename")
    @classmethod
    def _check_filename(cls, value: str) -> str:
        _header_safe(value, "filename")
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


def _check_meta_key(key: str) -> str:
    if not _META_KEY.fullmatch(key):
        raise ValueError(f"metadata key {key[:40]!r}: use 1-64 letters, digits, '_' or '-'")
    return key


def _meta_value_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a metadata value (header safety aside), or None: one flat JSON
    value that MongoDB stores and every vendor's JSON carries as is."""
    if not (value is None or isinstance(value, (str, int, float, bool))):
        return "a metadata value must be a string, number, boolean or null"
    if isinstance(value, float) and not math.isfinite(value):
        return f"a metadata value must be a finite number, not {value!r}"
    if isinstance(value, int) and not -(2**63) <= value < 2**63:  # MongoDB's widest integer
        return "a metadata value must fit in 64 bits"
    if isinstance(value, str) and len(value) > 1000:
        return "a metadata value must be at most 1000 characters"
    return None


def _check_meta_value(value: Any) -> Any:
    if (problem := _meta_value_problem(value)) is not None:
        raise ValueError(problem)
    if isinstance(value, str):
        _header_safe(value, "a metadata value")
    return value


def _plain_metadata(value: Any) -> bool:
    """True when ``value`` is metadata that every check above passes as it is (a dict, keys
    exactly ``str``: pydantic's pass would turn a subclass into one)."""
    if type(value) is not dict or len(value) > MAX_METADATA_KEYS:
        return False
    for key, item in value.items():
        if type(key) is not str or not _META_KEY.fullmatch(key) or _meta_value_problem(item) is not None:
            return False
        if isinstance(item, str) and _HEADER_UNSAFE.search(item):
            return False
    return True


def _metadata_fits(value: dict[str, Any]) -> dict[str, Any]:
    """``value``, if its JSON fits the one header line it travels as."""
    if not value or _metadata_json_bound(value) <= MAX_METADATA_JSON:
        return value  # surely short enough: no need to build the JSON
    if len(text := metadata_json(value)) > MAX_METADATA_JSON:
        raise ValueError(
            f"metadata is {len(text)} characters as JSON; it travels as one {METADATA_HEADER} "
            f"header line, so keep it to {MAX_METADATA_JSON} (fewer or shorter values)"
        )
    return value


MetaKey = Annotated[str, AfterValidator(_check_meta_key)]
# Any, checked by hand: a union would coerce (or report the failure once per member).
MetaValue = Annotated[Any, AfterValidator(_check_meta_value)]


class Email(BaseModel):
    """What an application asks us to send. ``from`` is spelled ``from_`` in Python."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: Address = Field(alias="from")
    to: AddressList = Field(min_length=1)
    cc: AddressList = Field(default_factory=list)
    bcc: AddressList = Field(default_factory=list)
    reply_to: AddressList = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    subject: str = Field(min_length=1, max_length=998)
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list, max_length=10)
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=MAX_METADATA_KEYS)
    attachments: list[Attachment] = Field(default_factory=list, max_length=100)
    priority: int | None = Field(None, ge=0, le=2**32 - 1, strict=True)
    send_at: dt.datetime | None = None
    delay: float | None = Field(None, ge=0, le=MAX_DELAY_S)
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)

    @field_validator("subject")
    @classmethod
    def _check_subject(cls, value: str) -> str:
        return _header_safe(value, "subject")

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 50:
            raise ValueError("at most 50 custom headers")
        for name, val in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name[:40]!r} is not a valid field name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by mailer; use the matching field instead")
            if name.lower().startswith(_RESERVED_PREFIXES):
                raise ValueError(
                    f"header {name!r} belongs to the MIME structure mailer builds; "
                    "use text, html and attachments instead"
                )
            _header_safe(val, f"header {name!r}")
            if len(val) > 998:
                raise ValueError(f"header {name!r} is longer than 998 characters")
        return value

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not _TAG.fullmatch(tag):
                raise ValueError(f"tag {tag[:40]!r}: use 1-64 ASCII letters, digits, '_' or '-'")
        return value

    @field_validator("metadata", mode="wrap")
    @classmethod
    def _check_metadata(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> dict[str, MetaValue]:
        # The common case, plain keys and values, is checked in one loop here; pydantic's
        # pass (one validator call per key and per value) runs for the rest and names the
        # wrong entry.
        checked: dict[str, MetaValue] = dict(value) if _plain_metadata(value) else handler(value)
        return _metadata_fits(checked)

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
        if ctx.get("trusted"):
            return self  # stored mails were measured when accepted
        limit = ctx.get("max_bytes", MAX_EMAIL_BYTES)
        if self._rough_bound() <= limit:
            return self  # far under the cap: the exact bound below could only be smaller
        parts = self._sizes()
        if (total := sum(parts.values()) + _MESSAGE_OVERHEAD) > limit:
            biggest = max(parts, key=lambda k: parts[k])
            raise _field_error(
                biggest,
                f"the mail is up to {total} bytes as sent (encoded); the limit is {limit} bytes: "
                f"make {biggest!r} smaller",
            )
        return self

    def _rough_bound(self) -> int:
        """A cheap bound that is never below ``size()``: every text character counted at 16
        bytes (UTF-8 is at most 4 per character; quoting, RFC 2047, base64 and punycode at
        most quadruple that), attachments as ``size()`` counts them, and a flat allowance for
        the per-field overheads and the metadata header (its JSON is capped at one line)."""
        # (Empty fields, most of any mail's, are skipped rather than summed: this runs for
        # every mail sent.)
        chars = len(self.subject) + len(self.text or "") + len(self.html or "")
        chars += len(self.idempotency_key or "") + len(self.from_.email) + len(self.from_.name or "") + 8
        fields = 4 + len(self.headers)
        for addresses in (self.to, self.cc, self.bcc, self.reply_to):
            if addresses:
                fields += len(addresses)
                for addr in addresses:
                    chars += len(addr.email) + len(addr.name or "") + 8
        if self.tags:
            chars += sum(len(t) + 4 for t in self.tags)
        if self.headers:
            chars += sum(len(k) + len(v) + 2 for k, v in self.headers.items())
        allowance = _MESSAGE_OVERHEAD + 2 * _PART_OVERHEAD + 16 * (fields + 2) + 2 * MAX_METADATA_JSON
        bound = 16 * chars + allowance
        if self.attachments:
            bound += sum(map(_attachment_cost, self.attachments))
        return bound

    def _sizes(self) -> dict[str, int]:
        """Each field's share of the wire size, as upper bounds of its MIME encoding."""
        meta = len(metadata_json(self.metadata)) + len(METADATA_HEADER) + 4 if self.metadata else 0
        return {
            "from": _address_cost(self.from_),
            "to": sum(map(_address_cost, self.to)),
            "cc": sum(map(_address_cost, self.cc)),
            "bcc": sum(map(_address_cost, self.bcc)),
            "reply_to": sum(map(_address_cost, self.reply_to)),
            "subject": _header_cost(self.subject),
            "text": _PART_OVERHEAD + body_encoding(self.text)[1] if self.text is not None else 0,
            "html": _PART_OVERHEAD + body_encoding(self.html)[1] if self.html is not None else 0,
            "headers": sum(len(k) + _header_cost(v) for k, v in self.headers.items()),
            "tags": sum(len(t) + 4 for t in self.tags),
            "metadata": meta,
            "attachments": sum(map(_attachment_cost, self.attachments)),
            "idempotency_key": len((self.idempotency_key or "").encode()),
        }

    def size(self) -> int:
        """An upper bound of the mail's size as sent: MIME-encoded bodies (quoted-printable or
        base64 with CRLF every 76 characters), RFC 2047 headers, every address and field.

        A bound, not an estimate, so a mail under the cap never grows past a relay's limit.
        """
        return sum(self._sizes().values()) + _MESSAGE_OVERHEAD

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
        elif p in ("function-after[_check_whole()]", "[key]"):
            continue
        else:
            name = "from" if p == "from_" else (str(p) or '""')  # an empty key still gets a name
            parts.append(("." if parts else "") + name)
    return "".join(parts) or "(mail)"


BAD_TEXT = "not valid UTF-8 text (undecodable bytes or a lone surrogate)"
TOO_DEEP = f"nested more than {MAX_NESTING} levels deep; no field of a mail nests like that"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(data: Any) -> list[tuple[str, str]]:
    """``(field, message)`` for strings that are not valid Unicode (lone surrogates:
    undecodable bytes smuggled into a str, or JSON ``\\ud800`` escapes, which neither MongoDB
    nor any vendor accepts) and for containers nested deeper than any field of a mail.

    Walked with an explicit stack, not recursion: input nested 5,000 deep must become a
    field error, not a RecursionError.
    """
    found: dict[str, str] = {}
    stack: list[tuple[Any, tuple[int | str, ...]]] = [(data, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            if not _is_utf8(value):
                found.setdefault(_field_name(loc), BAD_TEXT)
            continue
        if not isinstance(value, dict | list | tuple):
            continue
        if len(loc) >= MAX_NESTING:
            found.setdefault(_field_name(loc[:2]), TOO_DEEP)
            continue
        children: list[tuple[Any, tuple[int | str, ...]]] = []
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    children.append((key, (*loc, "(key)")))
                children.append((item, (*loc, key if isinstance(key, str | int) else repr(key))))
        else:
            children = [(item, (*loc, i)) for i, item in enumerate(value)]
        stack.extend(reversed(children))  # popped in input order
    return list(found.items())


def _plainly_clean(data: Any) -> bool:
    """True when no string in ``data`` holds a lone surrogate and nothing nests too deep: the
    common case, decided without building a location per value (``_bad_text``, which names the
    field, runs only when this says no). One UTF-8 encode of all the strings joined is cheaper
    than one per string."""
    parts: list[str] = []
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth >= MAX_NESTING:
            return False
        children = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in children:
            if isinstance(key, str):
                parts.append(key)
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, dict | list | tuple):
                stack.append((item, depth + 1))
    try:
        "".join(parts).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_json_text(data: str | bytes) -> list[tuple[str, str]]:
    """For JSON the parser refused: the fields holding invalid UTF-8 or lone surrogates, or
    nested too deep, if that is why (a lenient parse keeps surrogates, so they can be found)."""
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
        if not _plainly_clean(data) and (bad := _bad_text(data)):
            raise EmailValidationError(bad)
        return Email.model_validate(data, context=ctx)
    except ValidationError as exc:
        raw = exc.errors(include_url=False, include_input=False)
        json_only = all(e["type"] == "json_invalid" for e in raw)
        if isinstance(data, str | bytes) and json_only and (bad := _bad_json_text(data)):
            raise EmailValidationError(bad) from None
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
    # Withdrawn by the application before it was sent: the consumer deletes its job unsent.
    CANCELLED = "cancelled"
    # Every recipient was on the suppression list ([suppression] mode = drop): stored, never queued.
    SUPPRESSED = "suppressed"


Outcome = Literal["sent", "transient", "permanent", "auth", "unknown", "unavailable", "unsupported"]


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
