"""Mailgun webhooks (``POST /v1/webhooks/mailgun``).

Facts, from Mailgun's "Securing Webhooks"
(https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks):

- the body is JSON ``{"signature": {"timestamp", "token", "signature"}, "event-data": {...}}``;
  the signature sits in the body, not in a header;
- ``signature`` is the hex HMAC-SHA256 of ``timestamp`` and ``token`` concatenated with no
  separator, keyed with the account's HTTP webhook signing key (``[webhooks.mailgun]
  signing_key``);
- ``token`` is a random 50-character string: caching used tokens refuses replays, and
  checking ``timestamp`` against the clock refuses stale requests. The signature does not
  cover ``event-data``: TLS protects the body in transit, and the spent token makes a
  captured signature worthless on any other body.

``event-data`` (Mailgun's events API, as django-anymail reads it): ``event`` is ``delivered``,
``failed`` (``severity`` ``permanent`` or ``temporary``), ``rejected``, ``opened``,
``clicked``, ``unsubscribed``, ``complained`` (also ``accepted``/``stored``, ignored);
``id`` the event's id, ``timestamp`` epoch seconds, ``recipient``, and
``message.headers.message-id`` the message id without the angle brackets that the send
answer (what the adapter recorded) has: :func:`mailer.events.message_id_forms` matches both.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any

from mailer.config import MailgunWebhookSettings
from mailer.errors import WebhookMalformed, WebhookRefused
from mailer.events import Bounce, Event, EventType, event_key, from_epoch
from mailer.models import MAIL_ID_HEADER
from mailer.service.webhooks.base import Verified, as_dict, load_json, text
from mailer.store import MailStore

NAME = "mailgun"
_TYPES: dict[str, EventType] = {
    "delivered": EventType.DELIVERED,
    "rejected": EventType.REJECTED,
    "opened": EventType.OPENED,
    "clicked": EventType.CLICKED,
    "unsubscribed": EventType.UNSUBSCRIBED,
    "complained": EventType.COMPLAINED,
}


def _kind(data: Mapping[str, Any]) -> tuple[EventType, Bounce | None] | None:
    name = data.get("event")
    if name == "failed":
        # A temporary failure is retried by Mailgun: deferred; a permanent one bounced.
        return (
            (EventType.BOUNCED, "hard") if data.get("severity") == "permanent" else (EventType.DEFERRED, None)
        )
    found = _TYPES.get(str(name))
    return None if found is None else (found, None)


def _reason(data: Mapping[str, Any]) -> str | None:
    status = data.get("delivery-status")
    if isinstance(status, dict):
        return text(status.get("description")) or text(status.get("message"))
    return text(data.get("reason"))


def to_event(data: dict[str, Any]) -> Event | None:
    """One ``event-data`` as an Event (None for events mailer does not track)."""
    kind = _kind(data)
    if kind is None:
        return None
    event_id = text(data.get("id"))
    at = from_epoch(data.get("timestamp"))
    if event_id is None or at is None:
        raise WebhookMalformed("mailgun: event-data needs 'id' and a numeric 'timestamp'")
    message = data.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    headers = {str(k).lower(): v for k, v in headers.items()} if isinstance(headers, dict) else {}
    message_id = text(headers.get("message-id"))
    return Event(
        key=event_key(NAME, event_id),
        vendor=NAME,
        type=kind[0],
        bounce=kind[1],
        raw_name=str(data.get("event")),
        message_id=message_id,  # matched with or without the brackets of the send answer
        mailer_id=text(headers.get(MAIL_ID_HEADER.lower())),
        recipient=text(data.get("recipient")),
        at=at,
        reason=(_reason(data) or "")[:1000] or None,
        raw=data,
    )


class MailgunReceiver:
    name = NAME

    def __init__(self, settings: MailgunWebhookSettings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock

    def __repr__(self) -> str:
        return f"<MailgunReceiver signing_key={'set' if self._settings.signing_key else 'unset'}>"

    def _check_signature(self, signature: dict[str, Any]) -> tuple[float, str]:
        key = self._settings.signing_key
        if key is None:
            raise WebhookRefused(
                "mailgun webhooks are refused until [webhooks.mailgun] signing_key is set (the HTTP "
                "webhook signing key of the Mailgun account)"
            )
        timestamp, token, given = (text(signature.get(k)) for k in ("timestamp", "token", "signature"))
        if not (timestamp and token and given):
            raise WebhookRefused("mailgun: the signature needs timestamp, token and signature")
        expected = hmac.new(key.get_secret_value().encode(), (timestamp + token).encode(), hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest(), given.lower()):
            raise WebhookRefused(
                "mailgun: the signature does not match; check [webhooks.mailgun] signing_key"
            )
        try:
            signed_at = float(timestamp)
        except ValueError:
            raise WebhookRefused("mailgun: the signature's timestamp is not a number") from None
        if abs(self._clock() - signed_at) > self._settings.max_age_s:
            raise WebhookRefused(
                f"mailgun: the signature is older than {self._settings.max_age_s:g} s ([webhooks.mailgun] "
                "max_age_s), or the clocks disagree: check this host's clock"
            )
        return signed_at, token

    async def verify(self, headers: Mapping[str, str], body: bytes, store: MailStore) -> Verified:
        payload = as_dict(load_json(body, NAME), "mailgun: the body")
        signature = payload.get("signature")
        if not isinstance(signature, dict):
            raise WebhookRefused("mailgun: the body carries no signature object")
        _, token = self._check_signature(signature)
        seen = f"{NAME}:{token}"
        if await store.seen_before(seen):
            raise WebhookRefused("mailgun: this signature's token was used before (a replay)")
        event = to_event(as_dict(payload.get("event-data"), "mailgun: event-data"))
        return Verified(events=[] if event is None else [event], spend=[seen])
