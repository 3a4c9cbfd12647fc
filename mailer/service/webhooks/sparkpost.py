"""SparkPost event webhooks (``POST /v1/webhooks/sparkpost``).

Facts, from SparkPost's webhook documentation (webhooks API ``auth_type`` ``none``, ``basic``
or ``oauth2``) and django-anymail's receiver: batches are not signed; a webhook authenticates
with HTTP basic auth (``auth_credentials`` username and password) or with OAuth2, after which
SparkPost sends ``Authorization: Bearer <access token>``. Set ``[webhooks.sparkpost]``
``username`` + ``password``, or ``token`` (the access token your token endpoint issues to
SparkPost; this receiver checks it, it does not issue it). Each batch carries the header
``X-MessageSystems-Batch-ID``, the same on a redelivery, so a batch already taken is answered
200 at once.

Payload: a JSON array of ``{"msys": {CLASS: {...}}}`` (``message_event``, ``track_event``,
``gen_event``, ``unsubscribe_event``; ``{"msys": {}}`` is a ping) whose event has ``type``
(``delivery``, ``bounce``, ``out_of_band``, ``spam_complaint``, ``policy_rejection``,
``delay``, ``open``/``initial_open``, ``click``, ``list_unsubscribe``/``link_unsubscribe``,
``generation_failure``/``generation_rejection``; ``injection`` ignored), ``event_id``,
``timestamp`` (epoch seconds), ``transmission_id`` (the send answer's ``results.id``, what the
adapter recorded), ``rcpt_to``/``raw_rcpt_to``, ``raw_reason`` and, for bounces,
``bounce_class``: 10 (invalid recipient) and 30 (no RCPT) are hard, 90 an unsubscribe,
25 and 50-54 blocks (rejected), the rest soft (SparkPost's bounce classification).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailer.config import WebhookCredentials
from mailer.errors import WebhookMalformed
from mailer.events import Bounce, Event, EventType, event_key, from_epoch
from mailer.service.webhooks.base import Verified, as_dict, check_credentials, load_json, text
from mailer.store import MailStore

NAME = "sparkpost"
BATCH_HEADER = "x-messagesystems-batch-id"
_TYPES: dict[str, EventType] = {
    "delivery": EventType.DELIVERED,
    "spam_complaint": EventType.COMPLAINED,
    "policy_rejection": EventType.REJECTED,
    "generation_failure": EventType.REJECTED,
    "generation_rejection": EventType.REJECTED,
    "delay": EventType.DEFERRED,
    "open": EventType.OPENED,
    "initial_open": EventType.OPENED,
    "amp_open": EventType.OPENED,
    "click": EventType.CLICKED,
    "amp_click": EventType.CLICKED,
    "list_unsubscribe": EventType.UNSUBSCRIBED,
    "link_unsubscribe": EventType.UNSUBSCRIBED,
}
_HARD_CLASSES = frozenset({"10", "30"})
_BLOCK_CLASSES = frozenset({"25", "50", "51", "52", "53", "54"})


def _bounce(bounce_class: str | None) -> tuple[EventType, Bounce | None]:
    if bounce_class in _HARD_CLASSES:
        return EventType.BOUNCED, "hard"
    if bounce_class == "90":
        return EventType.UNSUBSCRIBED, None
    if bounce_class in _BLOCK_CLASSES:
        return EventType.REJECTED, None
    return EventType.BOUNCED, "soft"


def to_event(event: dict[str, Any], source: str) -> Event | None:
    raw_name = text(event.get("type"))
    if raw_name is None:
        raise WebhookMalformed("sparkpost: each event needs a 'type'")
    if raw_name in ("bounce", "out_of_band"):
        kind, bounce = _bounce(text(event.get("bounce_class")))
    elif raw_name in _TYPES:
        kind, bounce = _TYPES[raw_name], None
    else:
        return None
    at = from_epoch(event.get("timestamp"))
    if at is None:
        raise WebhookMalformed("sparkpost: each event needs a numeric 'timestamp'")
    event_id = text(event.get("event_id"))
    return Event(
        key=event_key(NAME, f"event:{event_id}" if event_id else source),
        vendor=NAME,
        type=kind,
        bounce=bounce,
        raw_name=raw_name,
        message_id=text(event.get("transmission_id")),
        recipient=text(event.get("raw_rcpt_to")) or text(event.get("rcpt_to")),
        at=at,
        reason=(text(event.get("raw_reason")) or text(event.get("reason")) or "")[:1000] or None,
        raw=event,
    )


def _unwrap(item: Any) -> dict[str, Any] | None:
    """The event inside ``{"msys": {CLASS: event}}``; None for a ping (``{"msys": {}}``)."""
    msys = as_dict(as_dict(item, "sparkpost: a batch item").get("msys"), "sparkpost: msys")
    if not msys:
        return None
    if len(msys) != 1:
        raise WebhookMalformed("sparkpost: msys holds exactly one event class")
    return as_dict(next(iter(msys.values())), "sparkpost: an event")


class SparkpostReceiver:
    name = NAME

    def __init__(self, credentials: WebhookCredentials) -> None:
        self._credentials = credentials

    def __repr__(self) -> str:
        return "<SparkpostReceiver>"

    async def verify(self, headers: Mapping[str, str], body: bytes, store: MailStore) -> Verified:
        check_credentials(headers, self._credentials, NAME)
        payload = load_json(body, NAME)
        if not isinstance(payload, list):
            raise WebhookMalformed("sparkpost: the body is a JSON array of {'msys': ...} items")
        batch = headers.get(BATCH_HEADER, "").strip()[:200]
        seen = f"{NAME}:batch:{batch}" if batch else None
        if seen is not None and await store.seen_before(seen):
            return Verified(duplicate=True, note=f"batch {batch} was already taken")
        events = []
        for i, item in enumerate(payload):
            inner = _unwrap(item)
            found = None if inner is None else to_event(inner, f"batch:{batch or '-'}:{i}")
            if found is not None:
                events.append(found)
        return Verified(events=events, spend=[seen] if seen else [])
