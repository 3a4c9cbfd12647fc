"""``POST /v1/webhooks/{vendor}``: delivery events pushed by each vendor.

Each vendor module checks its vendor's own documented authenticity mechanism (see their
docstrings) before anything is stored: a request that fails it gets 401 and stores nothing,
one not in the vendor's shape 400, an authentic one 200 (also when it was a redelivery and
added nothing: the vendor must stop retrying). Not behind ``[api] keys``: vendors cannot
send our API key, they authenticate by their own mechanism.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from mailer.config import Settings
from mailer.errors import WebhookMalformed, WebhookRefused, WebhookUnavailable
from mailer.events import ingest
from mailer.producer import Producer
from mailer.service.body import read_capped
from mailer.service.problems import refusal
from mailer.service.schemas import Errors
from mailer.service.webhooks.amazon import AmazonReceiver
from mailer.service.webhooks.base import Receiver
from mailer.service.webhooks.mailgun import MailgunReceiver
from mailer.service.webhooks.sendinblue import SendinblueReceiver
from mailer.service.webhooks.sparkpost import SparkpostReceiver

__all__ = ["Receiver", "WebhookResult", "build_receivers", "webhooks"]

VendorName = Literal["amazon", "mailgun", "sendinblue", "sparkpost"]
webhooks = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class WebhookResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    received: int = Field(ge=0, description="events in the request that mailer tracks")
    new: int = Field(ge=0, description="of them, not seen before (a redelivery adds nothing)")
    unknown: int = Field(ge=0, description="of them, for mails mailer does not know (kept apart)")
    suppressed: int = Field(ge=0, description="addresses this request put on the suppression list")
    duplicate: bool = Field(False, description="a batch already taken (SparkPost): nothing done")
    note: str | None = None


def build_receivers(settings: Settings) -> dict[str, Receiver]:
    w = settings.webhooks
    mailgun, vendor = w.mailgun, settings.vendors.mailgun
    if mailgun.signing_key is None and vendor is not None and vendor.webhook_signing_key is not None:
        mailgun = mailgun.model_copy(update={"signing_key": vendor.webhook_signing_key})
    return {
        "amazon": AmazonReceiver(w.amazon),
        "mailgun": MailgunReceiver(mailgun),
        "sendinblue": SendinblueReceiver(w.sendinblue),
        "sparkpost": SparkpostReceiver(w.sparkpost),
    }


def _receivers(request: Request) -> dict[str, Receiver]:
    """The app's receivers, built on first use (tests may set ``app.state.webhook_receivers``)."""
    found: dict[str, Receiver] | None = getattr(request.app.state, "webhook_receivers", None)
    if found is None:
        found = request.app.state.webhook_receivers = build_receivers(request.app.state.settings)
    return found


_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Errors} for code in (400, 401, 413, 422, 503)}


@webhooks.post(
    "/{vendor}", response_model=WebhookResult, responses=_ERRORS, summary="A vendor's delivery events"
)
async def receive(vendor: VendorName, request: Request) -> Any:
    """Authenticate the vendor's request, store its events (idempotently) and suppress the
    recipients of hard bounces and complaints ([suppression] add_on)."""
    settings: Settings = request.app.state.settings
    producer: Producer = request.app.state.producer
    body = await read_capped(request, settings.api.max_body_bytes)
    try:
        verified = await _receivers(request)[vendor].verify(request.headers, body, producer.store)
    except WebhookRefused as exc:
        return refusal(401, [("Authorization", str(exc))])
    except WebhookMalformed as exc:
        return refusal(400, [("(body)", str(exc))])
    except WebhookUnavailable as exc:
        return refusal(503, [("(service)", str(exc))], {"Retry-After": str(settings.api.retry_after_s)})
    if verified.duplicate:
        return WebhookResult(received=0, new=0, unknown=0, suppressed=0, duplicate=True, note=verified.note)
    done = await ingest(producer.store, verified.events, add_on=settings.suppression.add_on)
    for key in verified.spend:  # only once the events are stored: a retry after a failure is no replay
        await producer.store.mark_seen(key)
    return WebhookResult(
        received=done.received,
        new=done.new,
        unknown=done.unknown,
        suppressed=len(done.suppressed),
        note=verified.note,
    )
