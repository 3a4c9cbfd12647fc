"""Delivery events, normalised across vendors, and the suppression list's rules.

Every vendor reports what happened after it accepted a mail (delivered, bounced, a spam
complaint...) in its own words; the webhook receivers (:mod:`mailer.service.webhooks`) turn
each report into one :class:`Event`, the shape django-anymail also normalises to. Only the
normalised type drives behaviour; the vendor's own name and payload are kept for people.

Suppression protects the sender's reputation: a hard bounce or a complaint (configurable,
``[suppression] add_on``) puts the recipient on the list, and later sends to a listed address
are refused or have it dropped (``[suppression] mode``). Addresses are compared by
:func:`normalize_address`: the local part as is (RFC 5321 leaves its case to the receiving
host), the domain lowercased (domains are case-insensitive). The check is one indexed query
per write (``_id $in`` on the suppression collection), batched for a group commit.

Two things are deliberately separate: a mail's ``status`` says what *we* did (``sent``: a
vendor accepted it) and never changes because of an event; its ``delivery`` summary says
what the vendor reported afterwards (delivered at, bounced, complained).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field
from pymongo.errors import PyMongoError

from mailer.errors import RecipientSuppressed, StoreError
from mailer.models import Email, Status

if TYPE_CHECKING:
    from mailer.store import MailStore

Doc = dict[str, Any]
# Where a send's suppression check names the suppressed recipients of one mail.
SUPPRESSED_FIELD = "suppressed"


class EventType(StrEnum):
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    DEFERRED = "deferred"
    REJECTED = "rejected"
    OPENED = "opened"
    CLICKED = "clicked"
    UNSUBSCRIBED = "unsubscribed"


Bounce = Literal["hard", "soft"]


class Event(BaseModel):
    """One vendor report about one recipient of one mail, in mailer's words.

    ``key`` is deterministic per vendor event (vendor, the vendor's event or batch id, the
    index inside it), so a vendor that delivers the same report twice adds nothing.
    ``message_id`` is in the form the adapter recorded at send time; ``mailer_id`` is our
    ``X-Mailer-Id`` when the payload echoes our headers (SES does), the fallback match.
    """

    model_config = ConfigDict(frozen=True)

    key: str
    vendor: str
    type: EventType
    bounce: Bounce | None = None
    raw_name: str
    message_id: str | None = None
    mailer_id: str | None = None
    recipient: str | None = None
    at: dt.datetime
    reason: str | None = Field(None, max_length=1000)
    raw: dict[str, Any] = Field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The name ``[suppression] add_on`` uses: ``bounced_hard``, ``complained``..."""
        return f"bounced_{self.bounce or 'soft'}" if self.type is EventType.BOUNCED else self.type.value


def event_key(vendor: str, source_id: str, index: int = 0) -> str:
    """The event's ``_id``: a hash, so ids of any length or alphabet make a fixed-size key."""
    return hashlib.sha256(f"{vendor}\x00{source_id}\x00{index}".encode()).hexdigest()[:32]


def normalize_address(address: str) -> str:
    """The list's key for an address: the local part as is, the domain lowercased."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    local, at, domain = text.rpartition("@")
    return f"{local}@{domain.lower()}" if at and local else text


def suppresses(event: Event, add_on: Iterable[str]) -> bool:
    """Whether this event puts its recipient on the list under ``[suppression] add_on``."""
    return event.recipient is not None and event.kind in set(add_on)


def from_epoch(value: Any, *, millis: bool = False) -> dt.datetime | None:
    """A vendor's epoch timestamp (seconds, or milliseconds) as an aware datetime, or None."""
    try:
        seconds = float(value) / (1000 if millis else 1)
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def from_iso(value: Any) -> dt.datetime | None:
    """An ISO 8601 timestamp (SNS, SES) as an aware datetime, or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


# --- the check at send time -----------------------------------------------------------


class SuppressionList(Protocol):
    """What the check needs of the store: one query for many addresses."""

    async def suppressed_among(self, addresses: Collection[str]) -> set[str]: ...


def mail_recipients(mail: Email | Mapping[str, Any]) -> list[str]:
    """A mail's recipients (to, cc, bcc), normalised: from an Email or a stored ``mail``."""
    if isinstance(mail, Email):
        return [normalize_address(a.email) for a in mail.recipients()]
    found: list[str] = []
    for kind in ("to", "cc", "bcc"):  # a stored mail leaves out the empty ones
        for a in mail.get(kind) or ():
            found.append(normalize_address(str(a["email"])))
    return found


async def suppressed_per_mail(
    store: SuppressionList, mails: Sequence[Email | Mapping[str, Any]]
) -> list[list[str]]:
    """Per mail, its suppressed recipients (in the mail's order): one query for all.

    Almost every batch has no listed recipient, so that case costs one set and the lookup:
    the per-mail lists are built only when something is listed (a send's check is on the
    hot path of every mail)."""
    recipients = [mail_recipients(m) for m in mails]
    wanted = {a for found in recipients for a in found}
    listed = await store.suppressed_among(wanted) if wanted else set()
    if not listed:
        return [[] for _ in recipients]
    return [list(dict.fromkeys(a for a in found if a in listed)) for found in recipients]


def drop_recipients(doc: Doc, suppressed: Sequence[str]) -> None:
    """``[suppression] mode = drop`` on a new mail's document: remove the suppressed
    recipients and record them on the mail.

    A mail needs a ``to``: when every ``to`` is gone, the ``cc`` recipients take its place
    (they saw each other anyway). A mail left with neither (only ``bcc``, whose recipients
    must not be disclosed in a ``To``, or nobody) is marked ``suppressed``: stored, so the
    caller has an id to look up, with its recipients as given, and never queued.
    """
    gone = set(suppressed)
    mail = doc["mail"]
    kept = {
        kind: [a for a in mail.get(kind) or [] if normalize_address(str(a["email"])) not in gone]
        for kind in ("to", "cc", "bcc")
    }
    if not kept["to"]:
        kept["to"], kept["cc"] = kept["cc"], []
    doc[SUPPRESSED_FIELD] = list(suppressed)
    if not kept["to"]:
        doc["status"] = Status.SUPPRESSED.value
        return
    for kind, addresses in kept.items():
        if addresses or kind in mail:
            mail[kind] = addresses


class SuppressionCheck:
    """The producer's check before a write: refuse or drop, per ``[suppression] mode``."""

    def __init__(self, store: SuppressionList, mode: Literal["refuse", "drop"]) -> None:
        self._store = store
        self.mode = mode

    async def screen(self, docs: Sequence[Doc]) -> list[RecipientSuppressed | None]:
        """Per new mail document: the error refusing it, or None (it goes on, recipients
        dropped in ``drop`` mode). One query for the whole batch."""
        try:
            found = await suppressed_per_mail(self._store, [d["mail"] for d in docs])
        except PyMongoError as exc:
            raise StoreError(
                f"could not check the suppression list ({type(exc).__name__}); nothing was stored: "
                "check that MongoDB is reachable and send again"
            ) from None
        out: list[RecipientSuppressed | None] = []
        for doc, suppressed in zip(docs, found, strict=True):
            if suppressed and self.mode == "refuse":
                out.append(RecipientSuppressed({"to": suppressed}))
                continue
            if suppressed:
                drop_recipients(doc, suppressed)
            out.append(None)
        return out

    async def screen_all(self, docs: Sequence[Doc]) -> None:
        """``send_many``: like :meth:`screen`, but one refused mail refuses the whole batch
        (as one invalid mail does), naming each mail's index; nothing is stored."""
        refused = {i: err.addresses for i, err in enumerate(await self.screen(docs)) if err is not None}
        if refused:
            raise RecipientSuppressed({f"[{i}].to": found for i, found in refused.items()}, by_index=refused)


def to_queue(doc: Doc) -> bool:
    """Whether a stored new mail is to be queued (one left with no recipient is not)."""
    return bool(doc.get("status") != Status.SUPPRESSED.value)


# --- taking in a webhook's events ------------------------------------------------------


@dataclass(slots=True)
class Ingested:
    """What one webhook delivery added: ``new`` events (the rest were seen before),
    ``unknown`` (of mails we do not know), the addresses newly ``suppressed``."""

    received: int = 0
    new: int = 0
    unknown: int = 0
    suppressed: list[str] = field(default_factory=list)


def event_doc(event: Event, mail_id: str | None) -> Doc:
    """The stored event: its key is the ``_id``, so a redelivery is a duplicate key."""
    doc = event.model_dump(mode="python", exclude={"key"}, exclude_none=True)
    doc["_id"] = event.key
    doc["type"] = event.type.value
    if mail_id is not None:
        doc["mail_id"] = mail_id
    return doc


def merged_summary(current: Doc | None, events: Sequence[Event]) -> Doc:
    """The mail's ``delivery`` summary after ``events`` (new ones only: ``events`` counts)."""
    s: Doc = {"delivered_at": None, "bounced": False, "complained": False, "events": 0, **(current or {})}
    for e in events:
        if e.type is EventType.DELIVERED and (s["delivered_at"] is None or e.at < s["delivered_at"]):
            s["delivered_at"] = e.at
        if e.type is EventType.BOUNCED:
            s["bounced"] = True
            s["bounce"] = "hard" if "hard" in (e.bounce, s.get("bounce")) else "soft"
        if e.type is EventType.COMPLAINED:
            s["complained"] = True
        if s.get("last_at") is None or e.at >= s["last_at"]:
            s["last"], s["last_at"] = e.type.value, e.at
        s["events"] = int(s["events"]) + 1
    return s


def _merge_into(news: Sequence[Event], current: Doc | None) -> Doc:
    return merged_summary(current, news)


def message_id_forms(message_id: str) -> list[str]:
    """The forms a vendor message id may take: with and without angle brackets (Mailgun's
    send answer has them, its events' ``message-id`` header does not)."""
    bare = message_id.strip().strip("<>")
    return list(dict.fromkeys([message_id, bare, f"<{bare}>"]))


async def _match(store: MailStore, events: Sequence[Event]) -> list[str | None]:
    """Each event's mail: by the vendor message id recorded at send time, else by our
    X-Mailer-Id when the payload echoes it; None for a mail we do not know. Two queries."""
    wanted = [form for e in events if e.message_id for form in message_id_forms(e.message_id)]
    found = await store.mails_by_message_id(wanted)
    by_message = {
        e.message_id: next((found[f] for f in message_id_forms(e.message_id) if f in found), None)
        for e in events
        if e.message_id
    }
    fallback = [e.mailer_id for e in events if e.mailer_id and by_message.get(e.message_id or "") is None]
    known = await store.known_mails(m for m in fallback if m)
    out: list[str | None] = []
    for e in events:
        mail_id = by_message.get(e.message_id or "")
        if mail_id is None and e.mailer_id in known:
            mail_id = e.mailer_id
        out.append(mail_id)
    return out


async def ingest(store: MailStore, events: Sequence[Event], *, add_on: Iterable[str]) -> Ingested:
    """Store a webhook's events (idempotently), update each mail's summary with the new
    ones, and suppress the recipients of suppressing events (every time, not only when new:
    a redelivery after a failure half-way must still suppress; adding twice is a no-op)."""
    mail_ids = await _match(store, events)
    known = [(e, m) for e, m in zip(events, mail_ids, strict=True) if m is not None]
    strangers = [e for e, m in zip(events, mail_ids, strict=True) if m is None]
    fresh = await store.record_events([event_doc(e, m) for e, m in known])
    fresh_unknown = await store.record_events([event_doc(e, None) for e in strangers], unknown=True)
    by_mail: dict[str, list[Event]] = {}
    for (e, m), new in zip(known, fresh, strict=True):
        if new:
            by_mail.setdefault(m, []).append(e)
    for mail_id, news in by_mail.items():
        await store.update_delivery(mail_id, functools.partial(_merge_into, news))
    result = Ingested(received=len(events), new=sum(fresh) + sum(fresh_unknown), unknown=len(strangers))
    rules = set(add_on)
    for e, mail in zip(events, mail_ids, strict=True):
        if e.recipient is not None and suppresses(e, rules):
            address = normalize_address(e.recipient)
            source = {"vendor": e.vendor, "event": e.key, "type": e.kind, "mail_id": mail}
            if await store.add_suppression(address, reason=e.kind, source=source, settle=False):
                result.suppressed.append(address)
    if result.suppressed:
        await store.settle_suppressions()  # once for the delivery, not once per address
    return result


# --- what a mail's record shows (mailer status, GET /v1/emails/{id}) --------------------


class EventItem(BaseModel):
    """One stored event as people read it (the raw payload stays in MongoDB)."""

    model_config = ConfigDict(extra="ignore")

    vendor: str
    type: EventType
    bounce: Bounce | None = None
    raw_name: str
    recipient: str | None = None
    at: dt.datetime
    reason: str | None = None


class DeliverySummary(BaseModel):
    """What vendors reported after ``sent`` (``status`` itself never changes for it)."""

    model_config = ConfigDict(extra="ignore")

    delivered_at: dt.datetime | None = None
    bounced: bool = False
    bounce: Bounce | None = None
    complained: bool = False
    events: int = 0
    last: str | None = None
    last_at: dt.datetime | None = None


class DeliveryView(BaseModel):
    delivery: DeliverySummary | None = None
    events: list[EventItem] = Field(default_factory=list)
    suppressed: list[str] = Field(default_factory=list, description="recipients dropped as suppressed")


async def delivery_view(store: MailStore, mail_id: str) -> DeliveryView:
    """A mail's summary, events (oldest first) and suppressed recipients: two reads."""
    found = await store.delivery_of(mail_id)
    summary = found["delivery"]
    return DeliveryView(
        delivery=None if summary is None else DeliverySummary.model_validate(summary),
        events=[EventItem.model_validate(e) for e in await store.events_of(mail_id)],
        suppressed=found["suppressed"],
    )
