"""Amazon SES events through Amazon SNS (``POST /v1/webhooks/amazon``).

Facts, from "Verifying the signatures of Amazon SNS messages"
(https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html) and the SNS
HTTP(S) message formats:

- the body is JSON with ``Type`` (``Notification``, ``SubscriptionConfirmation``,
  ``UnsubscribeConfirmation``, also sent as header ``x-amz-sns-message-type``), ``MessageId``,
  ``TopicArn``, ``Message``, ``Timestamp``, ``SignatureVersion``, ``Signature`` (base64) and
  ``SigningCertURL``; confirmations add ``Token`` and ``SubscribeURL``;
- the string to sign is, in this order, each present field's name and value each followed by
  a newline: ``Message, MessageId, Subject (if present), Timestamp, TopicArn, Type`` for a
  notification, ``Message, MessageId, SubscribeURL, Timestamp, Token, TopicArn, Type`` for a
  confirmation; ``SignatureVersion`` 1 signs its SHA1 hash, 2 its SHA256 hash (RSA PKCS#1 v1.5);
- the certificate must come over HTTPS from Amazon SNS (``sns.REGION.amazonaws.com``, and
  ``.amazonaws.com.cn`` in China): its URL's origin must match ``[webhooks.amazon]
  cert_origins``, so a forged ``SigningCertURL`` never names a key of the sender's choosing
  (TLS then vouches for the host; the certificate's chain is not checked separately);
- messages of an unexpected ``TopicArn`` must be rejected: any AWS account can sign SNS
  messages, so only ``[webhooks.amazon] topic_arns`` are accepted;
- a subscription is confirmed by visiting ``SubscribeURL`` (done when
  ``confirm_subscriptions``, and only at an allowed origin).

The SES event in ``Message`` (SES event publishing, ``eventType``, or notifications,
``notificationType``): ``Bounce`` (``bounce.bounceType`` ``Permanent`` is hard;
``bouncedRecipients[].emailAddress``, ``diagnosticCode``), ``Complaint``
(``complainedRecipients``), ``Delivery`` (``delivery.recipients``), ``Reject``,
``DeliveryDelay`` (``delayedRecipients``), ``Open``, ``Click``, ``Subscription``,
``Rendering Failure``; ``mail.messageId`` is the send answer's ``MessageId`` and
``mail.headers`` echo ours, ``X-Mailer-Id`` included.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mailer.config import SnsWebhookSettings
from mailer.errors import WebhookMalformed, WebhookRefused, WebhookUnavailable
from mailer.events import Bounce, Event, EventType, event_key, from_iso
from mailer.models import MAIL_ID_HEADER
from mailer.service.webhooks.base import Verified, as_dict, load_json, text
from mailer.store import MailStore

NAME = "amazon"
NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_FIELDS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
_TYPES = {"Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"}
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
_MAX_CERTS = 32
Fetch = Callable[[str], Awaitable[bytes]]


def string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The bytes SNS signed (see the module's facts); KeyError when a required field is missing."""
    fields = NOTIFICATION_FIELDS if message["Type"] == "Notification" else CONFIRMATION_FIELDS
    out = []
    for name in fields:
        if name == "Subject" and name not in message:
            continue
        out.append(f"{name}\n{message[name]}\n")
    return "".join(out).encode()


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _detail(event: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The event type's own object: ``bounce`` for Bounce, ``deliveryDelay``, ``failure``..."""
    return _obj(event.get("failure" if kind == "Rendering Failure" else kind[0].lower() + kind[1:]))


def _recipients(event: Mapping[str, Any], kind: str) -> list[tuple[str | None, str | None]]:
    """``(address, reason)`` per recipient of an SES event."""
    detail = _detail(event, kind)
    if kind == "Bounce":
        listed = detail.get("bouncedRecipients") or []
        return [
            (text(r.get("emailAddress")), text(r.get("diagnosticCode")))
            for r in listed
            if isinstance(r, dict)
        ]
    if kind == "Complaint":
        listed = detail.get("complainedRecipients") or []
        reason = text(detail.get("complaintFeedbackType"))
        return [(text(r.get("emailAddress")), reason) for r in listed if isinstance(r, dict)]
    if kind == "DeliveryDelay":
        listed = detail.get("delayedRecipients") or []
        return [
            (text(r.get("emailAddress")), text(r.get("diagnosticCode")))
            for r in listed
            if isinstance(r, dict)
        ]
    if kind == "Delivery":
        return [(text(r), text(detail.get("smtpResponse"))) for r in detail.get("recipients") or []]
    destination = _obj(event.get("mail")).get("destination")
    reason = text(detail.get("reason")) or text(detail.get("errorMessage"))
    return [(text(r), reason) for r in destination or []]


_SES_TYPES: dict[str, EventType] = {
    "Complaint": EventType.COMPLAINED,
    "Delivery": EventType.DELIVERED,
    "Reject": EventType.REJECTED,
    "Rendering Failure": EventType.REJECTED,
    "DeliveryDelay": EventType.DEFERRED,
    "Open": EventType.OPENED,
    "Click": EventType.CLICKED,
    "Subscription": EventType.UNSUBSCRIBED,
}


def _header(mail: Mapping[str, Any], name: str) -> str | None:
    for h in mail.get("headers") or []:
        if isinstance(h, dict) and str(h.get("name", "")).lower() == name.lower():
            return text(h.get("value"))
    return None


def ses_events(event: dict[str, Any], sns_id: str, sns_time: str | None) -> list[Event]:
    """The SES event of one notification as one Event per recipient."""
    kind = text(event.get("eventType")) or text(event.get("notificationType"))
    if kind is None:
        raise WebhookMalformed("amazon: the SES event has neither eventType nor notificationType")
    bounce: Bounce | None = None
    if kind == "Bounce":
        bounce = "hard" if _detail(event, kind).get("bounceType") == "Permanent" else "soft"
        etype = EventType.BOUNCED
    elif kind in _SES_TYPES:
        etype = _SES_TYPES[kind]
    else:
        return []  # Send, and types mailer does not track
    mail = _obj(event.get("mail"))
    at = (
        from_iso(_detail(event, kind).get("timestamp"))
        or from_iso(mail.get("timestamp"))
        or from_iso(sns_time)
    )
    if at is None:
        raise WebhookMalformed("amazon: the SES event carries no timestamp")
    return [
        Event(
            key=event_key(NAME, sns_id, i),
            vendor=NAME,
            type=etype,
            bounce=bounce,
            raw_name=kind,
            message_id=text(mail.get("messageId")),
            mailer_id=_header(mail, MAIL_ID_HEADER),
            recipient=address,
            at=at,
            reason=(reason or "")[:1000] or None,
            raw=event,
        )
        for i, (address, reason) in enumerate(_recipients(event, kind))
    ]


async def _http_get(url: str, timeout_s: float) -> bytes:
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        response = await client.get(url)
        response.raise_for_status()
        return response.content


class AmazonReceiver:
    name = NAME

    def __init__(self, settings: SnsWebhookSettings, *, fetch: Fetch | None = None) -> None:
        self._settings = settings
        self._origins = [re.compile(p) for p in settings.cert_origins]
        self._fetch: Fetch = fetch or (lambda url: _http_get(url, settings.timeout_s))
        self._certs: dict[str, rsa.RSAPublicKey] = {}

    def __repr__(self) -> str:
        return f"<AmazonReceiver topics={len(self._settings.topic_arns)}>"

    def _allowed(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
        except ValueError:
            return False
        origin = f"{parts.scheme}://{parts.netloc}"
        return not parts.username and any(p.fullmatch(origin) for p in self._origins)

    async def _public_key(self, url: str) -> rsa.RSAPublicKey:
        """The signing certificate's key, fetched once per URL (SNS rotates by URL)."""
        if url in self._certs:
            return self._certs[url]
        try:
            pem = await self._fetch(url)
        except httpx.HTTPError as exc:
            raise WebhookUnavailable(
                f"amazon: cannot fetch the SNS signing certificate ({type(exc).__name__})"
            ) from None
        try:
            key = x509.load_pem_x509_certificate(pem).public_key()
        except ValueError:
            raise WebhookRefused("amazon: SigningCertURL does not serve a PEM certificate") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise WebhookRefused("amazon: the signing certificate's key is not RSA")
        if len(self._certs) >= _MAX_CERTS:
            self._certs.pop(next(iter(self._certs)))
        self._certs[url] = key
        return key

    async def _check_signature(self, message: dict[str, Any]) -> None:
        version = text(message.get("SignatureVersion"))
        if version not in _HASHES:
            raise WebhookRefused("amazon: SignatureVersion must be 1 or 2")
        cert_url = text(message.get("SigningCertURL")) or ""
        if not self._allowed(cert_url) or not urlsplit(cert_url).path.endswith(".pem"):
            raise WebhookRefused(
                "amazon: SigningCertURL is not an Amazon SNS certificate URL ([webhooks.amazon] cert_origins)"
            )
        try:
            signature = base64.b64decode(text(message.get("Signature")) or "", validate=True)
            signed = string_to_sign(message)
        except (binascii.Error, ValueError):
            raise WebhookRefused("amazon: the Signature is not base64") from None
        except KeyError as missing:
            raise WebhookMalformed(f"amazon: the message lacks {missing}") from None
        key = await self._public_key(cert_url)
        try:
            key.verify(signature, signed, padding.PKCS1v15(), _HASHES[version]())
        except InvalidSignature:
            raise WebhookRefused("amazon: the SNS signature does not match the message") from None

    async def _confirm(self, message: dict[str, Any]) -> str:
        url = text(message.get("SubscribeURL")) or ""
        if not self._settings.confirm_subscriptions:
            return "subscription not confirmed ([webhooks.amazon] confirm_subscriptions = false)"
        if not self._allowed(url):
            raise WebhookRefused("amazon: SubscribeURL is not at an Amazon SNS origin")
        try:
            await self._fetch(url)
        except httpx.HTTPError as exc:
            raise WebhookUnavailable(
                f"amazon: could not confirm the subscription ({type(exc).__name__})"
            ) from None
        return "subscription confirmed"

    async def verify(self, headers: Mapping[str, str], body: bytes, store: MailStore) -> Verified:
        message = as_dict(load_json(body, NAME), "amazon: the SNS message")
        kind = text(message.get("Type"))
        if kind not in _TYPES:
            raise WebhookMalformed(
                "amazon: Type must be Notification, SubscriptionConfirmation or UnsubscribeConfirmation"
            )
        if headers.get("x-amz-sns-message-type", kind) != kind:
            raise WebhookMalformed("amazon: the x-amz-sns-message-type header differs from the body's Type")
        if text(message.get("TopicArn")) not in self._settings.topic_arns:
            raise WebhookRefused(
                "amazon: the topic is not accepted; add its ARN to [webhooks.amazon] topic_arns"
            )
        await self._check_signature(message)
        if kind == "SubscriptionConfirmation":
            return Verified(note=await self._confirm(message))
        if kind == "UnsubscribeConfirmation":
            return Verified(note="unsubscribed")
        raw = text(message.get("Message")) or ""
        try:
            ses = json.loads(raw)
        except ValueError:
            return Verified(note="not an SES event")  # e.g. SES's "Successfully validated SNS topic"
        sns_id = text(message.get("MessageId")) or ""
        return Verified(
            events=ses_events(as_dict(ses, "amazon: the SES event"), sns_id, text(message.get("Timestamp")))
        )
