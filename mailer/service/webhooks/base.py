"""What every webhook receiver shares: the outcome of a verified request, JSON parsing
that refuses rather than crashes, and the basic / bearer credential check of the vendors
that authenticate by credentials (Brevo, SparkPost) rather than by signature.

Credentials are compared as SHA-256 digests with ``hmac.compare_digest`` (no early exit, no
length leak), and neither the configured nor the presented value is ever put in a message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mailer.config import WebhookCredentials
from mailer.errors import WebhookMalformed, WebhookRefused
from mailer.events import Event
from mailer.store import MailStore


@dataclass(slots=True)
class Verified:
    """An authentic request: its events, the replay keys to remember once they are stored
    (Mailgun tokens, SparkPost batch ids), and ``duplicate`` for a batch already taken."""

    events: list[Event] = field(default_factory=list)
    spend: list[str] = field(default_factory=list)
    duplicate: bool = False
    note: str | None = None


class Receiver(Protocol):
    name: str

    async def verify(self, headers: Mapping[str, str], body: bytes, store: MailStore) -> Verified:
        """The request's events once it passed the vendor's authenticity check; raises
        WebhookRefused (401), WebhookMalformed (400) or WebhookUnavailable (503)."""
        ...


def load_json(body: bytes, vendor: str) -> Any:
    """The body as JSON, or WebhookMalformed (never a 500 for what a client sent)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise WebhookMalformed(f"{vendor}: the JSON body is nested too deeply") from None
    except ValueError as exc:
        raise WebhookMalformed(f"{vendor}: the body is not JSON ({exc})") from None


def as_dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WebhookMalformed(f"{what} must be a JSON object")
    return value


def text(value: Any) -> str | None:
    """A scalar payload field as text (vendors send numbers as strings or numbers)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _same(presented: str, configured: str) -> bool:
    digest = hashlib.sha256
    return hmac.compare_digest(digest(presented.encode()).digest(), digest(configured.encode()).digest())


def check_credentials(headers: Mapping[str, str], creds: WebhookCredentials, vendor: str) -> None:
    """Accept ``Authorization: Basic`` with the configured user and password, or
    ``Authorization: Bearer`` with the configured token; WebhookRefused otherwise."""
    section = f"[webhooks.{vendor}]"
    if creds.token is None and (creds.username is None or creds.password is None):
        raise WebhookRefused(
            f"{vendor} webhooks are refused until {section} has username and password (basic auth) "
            "or token (bearer), set to what the vendor's webhook is configured to send"
        )
    scheme, _, value = headers.get("authorization", "").partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and creds.token is not None:
        if _same(value.strip(), creds.token.get_secret_value()):
            return
    elif scheme == "basic" and creds.username is not None and creds.password is not None:
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, sep, password = "", "", ""
        ok_user = _same(user, creds.username)
        ok_password = _same(password, creds.password.get_secret_value())
        if sep and ok_user and ok_password:
            return
    raise WebhookRefused(
        f"{vendor}: missing or wrong credentials; send the basic auth or bearer token set in {section}"
    )
