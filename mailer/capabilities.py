"""What each vendor documents it cannot carry, declared once for its adapter and the producer.

An adapter refuses such a mail with UnsupportedByVendor before any request, and delivery moves
on to the next vendor; but a mail that *no* enabled vendor can carry would be stored, queued,
tried everywhere and failed, when the producer could have said so at once. Both sides call the
same check here, so the edge can never refuse what an adapter would send, nor disagree on why.

This module is pure (models, errors and config only): the producer may use it without
importing ``mailer.vendors`` and with it the vendors' SDKs. A vendor without a row here has
no limit the edge can know; SMTP's one refusal (no SMTPUTF8) depends on the relay, so it has
none, and a mail is refused at the edge only when every enabled vendor has a row that refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from mailer.config import Settings
from mailer.errors import EmailValidationError, UnsupportedByVendor
from mailer.models import Address, Email

MAILGUN_MAX_TAGS = 3


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one vendor cannot carry a mail: the field at fault and the vendor's documented limit."""

    field: str
    reason: str


Check = Callable[[Email], Refusal | None]


def smtputf8_field(email: Email) -> str | None:
    """The first field with a mailbox whose local part is not ASCII: no 7-bit encoding (and so
    no vendor without SMTPUTF8) can carry it."""
    fields: Iterable[tuple[str, Iterable[Address]]] = (
        ("from", (email.from_,)),
        ("to", email.to),
        ("cc", email.cc),
        ("bcc", email.bcc),
        ("reply_to", email.reply_to),
    )
    for field, addresses in fields:
        if any(not a.email.rpartition("@")[0].isascii() for a in addresses):
            return field
    return None


def mailgun(email: Email) -> Refusal | None:
    """Mailgun's API reference allows three ``o:tag`` per message; extra ones are reported to be
    dropped silently, so more is refused rather than sent with tags missing."""
    if len(email.tags) <= MAILGUN_MAX_TAGS:
        return None
    return Refusal(
        "tags",
        f"{len(email.tags)} tags; Mailgun takes at most {MAILGUN_MAX_TAGS} per message (use fewer tags)",
    )


def sendinblue(email: Email) -> Refusal | None:
    """Brevo's ``replyTo`` is one address."""
    if len(email.reply_to) <= 1:
        return None
    return Refusal(
        "reply_to", f"{len(email.reply_to)} reply-to addresses; Brevo takes only one (give one reply_to)"
    )


def sparkpost(email: Email) -> Refusal | None:
    """SparkPost carries tags under ``metadata["tags"]`` (its ``campaign_id`` is one string for
    reporting, not labels), so a mail with tags cannot also use that metadata key."""
    if not (email.tags and "tags" in email.metadata):
        return None
    return Refusal(
        "metadata",
        "metadata key 'tags' is taken; SparkPost carries the mail's tags under it (rename the key)",
    )


def amazon(email: Email) -> Refusal | None:
    """SES documents no SMTPUTF8: a local part must be 7-bit ASCII (IDN domains are fine)."""
    field = smtputf8_field(email)
    if field is None:
        return None
    return Refusal(field, "a mailbox has a non-ASCII local part and SES does not support SMTPUTF8")


# Vendor name (as in config.VENDORS) -> its documented limits. Cheapest check first: the edge
# stops at the first vendor that can carry the mail, which for a common mail is the first.
LIMITS: Mapping[str, Check] = MappingProxyType(
    {"mailgun": mailgun, "sendinblue": sendinblue, "sparkpost": sparkpost, "amazon": amazon}
)


def enforce(check: Check, vendor: str, email: Email) -> None:
    """The adapter's side: UnsupportedByVendor, before any request, for what ``check`` refuses."""
    refusal = check(email)
    if refusal is not None:
        raise UnsupportedByVendor(vendor, f"{refusal.reason}; another vendor can send it")


# --- the producer's side ------------------------------------------------------------------

_Gate = tuple[tuple[str, Check], ...] | None
_gates: dict[int, tuple[Settings, _Gate]] = {}
_MAX_GATES = 64


def _gate(names: Sequence[str]) -> _Gate:
    """The enabled vendors' checks, cheapest first; None when some vendor has none (then no
    mail can be shown to be uncarriable, and the edge checks nothing)."""
    if not names or any(name not in LIMITS for name in names):
        return None
    return tuple((name, LIMITS[name]) for name in sorted(set(names), key=list(LIMITS).index))


def _gate_for(settings: Settings) -> _Gate:
    """Cached per settings object, so the hot path pays one dict lookup, not vendor_order()."""
    hit = _gates.get(id(settings))
    if hit is not None and hit[0] is settings:
        return hit[1]
    gate = _gate(settings.vendor_order())
    if len(_gates) >= _MAX_GATES:
        _gates.pop(next(iter(_gates)))
    _gates[id(settings)] = (settings, gate)
    return gate


def refuse_uncarriable(email: Email, settings: Settings) -> Email:
    """``email`` itself, or EmailValidationError when no vendor in ``settings.vendor_order()``
    can carry it by its documented limits; each entry names the field and one vendor's reason."""
    gate = _gate_for(settings)
    if gate is None:
        return email
    refusals: list[tuple[str, Refusal]] = []
    for name, check in gate:
        refusal = check(email)
        if refusal is None:
            return email
        refusals.append((name, refusal))
    order = settings.vendor_order()
    refusals.sort(key=lambda r: order.index(r[0]))
    raise EmailValidationError(
        [(r.field, f"no enabled vendor can carry this mail; {name}: {r.reason}") for name, r in refusals]
    )
