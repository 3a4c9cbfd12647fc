"""``GET/POST/DELETE /v1/suppressions``: the suppression list by hand, behind ``[api] keys``.

Addresses are validated as a mail's would be, then keyed as the send-time check keys them
(:func:`mailer.events.normalize_address`: the local part as is, the domain lowercased).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from mailer.errors import RecipientSuppressed
from mailer.events import normalize_address
from mailer.models import Email, normalize_email
from mailer.producer import Producer
from mailer.service.auth import authorize
from mailer.service.problems import ApiError
from mailer.service.schemas import Errors
from mailer.store import Doc, MailStore

suppressions = APIRouter(prefix="/v1/suppressions", dependencies=[Depends(authorize)], tags=["suppressions"])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Errors} for code in (401, 403, 404, 422, 503)}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Suppression(_Body):
    address: str
    reason: str
    at: dt.datetime
    source: dict[str, Any] | None = Field(
        None, description="the event that added it (vendor, event, mail_id)"
    )


class SuppressionPage(_Body):
    suppressions: list[Suppression]
    next: str | None = Field(None, description="pass as ?after= for the next page; null on the last")


class NewSuppression(_Body):
    address: str = Field(max_length=320, description="an e-mail address, e.g. user@example.com")
    reason: str = Field("manual", min_length=1, max_length=200)


class Changed(_Body):
    address: str
    changed: bool = Field(description="false: it was already on the list (POST) / already off")


def address_key(value: str, field: str = "address") -> str:
    """The list's key for a given address; 422 when it is not one."""
    try:
        return normalize_address(normalize_email(value.strip()))
    except ValueError as exc:
        raise ApiError(422, field, f"{exc}; give one e-mail address such as user@example.com") from None


def as_entry(doc: Doc) -> Suppression:
    return Suppression(
        address=str(doc["_id"]), reason=str(doc.get("reason", "")), at=doc["at"], source=doc.get("source")
    )


def _store(request: Request) -> MailStore:
    producer: Producer = request.app.state.producer
    return producer.store


StoreDep = Annotated[MailStore, Depends(_store)]


@suppressions.get("", response_model=SuppressionPage, responses=_ERRORS, summary="The suppression list")
async def list_suppressions(
    store: StoreDep,
    after: Annotated[str, Query(max_length=320)] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> SuppressionPage:
    """Entries in address order, ``limit`` at a time from just after ``after``."""
    found = await store.list_suppressions(after=after, limit=limit)
    entries = [as_entry(d) for d in found]
    return SuppressionPage(suppressions=entries, next=entries[-1].address if len(entries) == limit else None)


@suppressions.post("", response_model=Changed, responses=_ERRORS, summary="Suppress an address")
async def add_suppression(body: NewSuppression, store: StoreDep) -> Changed:
    """Later sends to it are refused or have it dropped ([suppression] mode)."""
    address = address_key(body.address)
    return Changed(address=address, changed=await store.add_suppression(address, reason=body.reason))


@suppressions.delete(
    "/{address}", response_model=Changed, responses=_ERRORS, summary="Allow an address again"
)
async def remove_suppression(address: str, store: StoreDep) -> Changed:
    key = address_key(address)
    if not await store.remove_suppression(key):
        raise ApiError(404, "address", f"{key} is not on the suppression list")
    return Changed(address=key, changed=True)


async def send_many_but_suppressed(
    producer: Producer, mails: Sequence[Email], refused: dict[int, RecipientSuppressed]
) -> list[str]:
    """``send_many`` for the batch route: a mail refused as suppressed is refused alone (into
    ``refused``, by its position), as an invalid one is, and the others are sent (a second
    ``send_many``; the ids are theirs, in order). Filled before that second call, so an
    EnqueueError it raises still leaves ``refused`` right."""
    try:
        return await producer.send_many(mails)
    except RecipientSuppressed as exc:
        refused.update({i: RecipientSuppressed({"to": found}) for i, found in exc.by_index.items()})
    rest = [m for i, m in enumerate(mails) if i not in refused]
    return await producer.send_many(rest) if rest else []
