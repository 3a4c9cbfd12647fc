"""Brevo (formerly Sendinblue) transactional webhooks (``POST /v1/webhooks/sendinblue``).

Facts, from Brevo's "Secure webhook calls" (https://developers.brevo.com/docs/secured-webhooks):
Brevo does not sign webhooks; a webhook is authenticated as configured on its side, either
with a username and password in its URL (``https://user:password@host/...``, sent as HTTP
basic auth) or with a bearer token in the ``Authorization`` header. Set the same in
``[webhooks.sendinblue]`` (``username`` + ``password``, or ``token``).

Payload (Brevo's transactional webhook events, as django-anymail reads them): one JSON object
per event (a list of them for batched webhooks) with ``event`` (``delivered``,
``hard_bounce``, ``soft_bounce``, ``spam``, ``blocked``, ``invalid_email``, ``deferred``,
``opened``/``unique_opened``/``proxy_open``, ``click``, ``unsubscribed``, ``error``; newer
accounts spell them camelCase, ``hardBounce``), ``email`` the recipient, ``message-id`` as the
send answer's ``messageId`` (angle brackets included), ``ts_epoch`` in milliseconds (the only
field that is always UTC) and ``reason``. Brevo gives no event id, so an event's key hashes
its message id, name, recipient and time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from mailer.config import WebhookCredentials
from mailer.errors import WebhookMalformed
from mailer.events import Bounce, Event, EventType, event_key, from_epoch
from mailer.service.webhooks.base import Verified, as_dict, check_credentials, load_json, text
from mailer.store import MailStore

NAME = "sendinblue"
_TYPES: dict[str, tuple[EventType, Bounce | None]] = {
    "delivered": (EventType.DELIVERED, None),
    "hard_bounce": (EventType.BOUNCED, "hard"),
    "invalid_email": (EventType.BOUNCED, "hard"),
    "soft_bounce": (EventType.BOUNCED, "soft"),
    "spam": (EventType.COMPLAINED, None),
    "blocked": (EventType.REJECTED, None),
    "error": (EventType.REJECTED, None),
    "deferred": (EventType.DEFERRED, None),
    "opened": (EventType.OPENED, None),
    "unique_opened": (EventType.OPENED, None),
    "proxy_open": (EventType.OPENED, None),
    "click": (EventType.CLICKED, None),
    "clicked": (EventType.CLICKED, None),
    "unsubscribed": (EventType.UNSUBSCRIBED, None),
    "unsubscribe": (EventType.UNSUBSCRIBED, None),
}
_CAMEL = re.compile(r"(?<=[a-z])([A-Z])")


def _name(raw: str) -> str:
    """``hardBounce`` and ``hard_bounce`` alike."""
    return _CAMEL.sub(r"_\1", raw).lower()


def to_event(data: dict[str, Any]) -> Event | None:
    raw_name = text(data.get("event"))
    if raw_name is None:
        raise WebhookMalformed("sendinblue: each event needs an 'event' name")
    kind = _TYPES.get(_name(raw_name))
    if kind is None:
        return None  # request, sent, list_addition...: not tracked
    at = from_epoch(data.get("ts_epoch"), millis=True) or from_epoch(data.get("ts_event") or data.get("ts"))
    if at is None:
        raise WebhookMalformed("sendinblue: each event needs 'ts_epoch' (milliseconds) or 'ts_event'")
    message_id = text(data.get("message-id")) or text(data.get("messageId"))
    recipient = text(data.get("email"))
    source = f"{message_id}|{raw_name}|{recipient}|{int(at.timestamp() * 1000)}"
    return Event(
        key=event_key(NAME, source),
        vendor=NAME,
        type=kind[0],
        bounce=kind[1],
        raw_name=raw_name,
        message_id=message_id,
        recipient=recipient,
        at=at,
        reason=(text(data.get("reason")) or "")[:1000] or None,
        raw=data,
    )


class SendinblueReceiver:
    name = NAME

    def __init__(self, credentials: WebhookCredentials) -> None:
        self._credentials = credentials

    def __repr__(self) -> str:
        return "<SendinblueReceiver>"

    async def verify(self, headers: Mapping[str, str], body: bytes, store: MailStore) -> Verified:
        check_credentials(headers, self._credentials, NAME)
        payload = load_json(body, NAME)
        items = payload if isinstance(payload, list) else [payload]
        events = [to_event(as_dict(item, "sendinblue: an event")) for item in items]
        return Verified(events=[e for e in events if e is not None])
