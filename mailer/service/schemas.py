"""The bodies the API answers with, as pydantic models: they are the OpenAPI schema too.

One error shape everywhere (a whole request or one item of a batch): ``{"errors": [{"field",
"message"}]}``, with ``field`` the path from the body's root (``to``, ``emails[3].to``), a
header (``Authorization``) or ``(body)`` for the body as a whole.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mailer.events import DeliverySummary, DeliveryView, EventItem
from mailer.models import Attempt, MailRecord, Status

STORED_NOT_QUEUED = (
    "stored in MongoDB but not yet queued (beanstalkd did not take the job): the requeue sweep "
    "queues it, nothing needs to be sent again"
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorItem(_Body):
    field: str = Field(description="where: a field path from the body's root, a header, or (body)")
    message: str = Field(description="what is wrong and what to do")


class Errors(_Body):
    errors: list[ErrorItem] = Field(min_length=1)


class Accepted(_Body):
    id: str = Field(description="the mail's id (24 hex characters)", pattern=r"^[0-9a-f]{24}$")
    queued: bool = Field(description="false: stored, the requeue sweep queues it (see detail)")
    detail: str | None = None


class BatchAccepted(_Body):
    id: str = Field(pattern=r"^[0-9a-f]{24}$")
    queued: bool


class BatchResult(_Body):
    results: list[BatchAccepted | Errors] = Field(
        description="one per mail, in order: {id, queued} or {errors} (that mail stored nothing)"
    )
    accepted: int = Field(ge=0)
    rejected: int = Field(ge=0)
    detail: str | None = None


class MailStatus(_Body):
    """A mail's delivery record; the mail's content is not echoed back."""

    id: str = Field(pattern=r"^[0-9a-f]{24}$")
    status: Status
    created_at: dt.datetime
    updated_at: dt.datetime
    sent_at: dt.datetime | None = None
    vendor: str | None = None
    message_id: str | None = None
    error: str | None = None
    rounds: int = Field(ge=0)
    attempts: list[Attempt]
    idempotency_key: str | None = None
    # What vendors reported after 'sent' (webhooks), and recipients dropped as suppressed.
    delivery: DeliverySummary | None = None
    events: list[EventItem] = Field(default_factory=list)
    suppressed: list[str] = Field(default_factory=list)

    @classmethod
    def of(cls, record: MailRecord, view: DeliveryView | None = None) -> MailStatus:
        view = view or DeliveryView()
        return cls(
            id=record.id,
            status=record.status,
            created_at=record.created_at,
            updated_at=record.updated_at,
            sent_at=record.sent_at,
            vendor=record.vendor,
            message_id=record.message_id,
            error=record.error,
            rounds=record.rounds,
            attempts=record.attempts,
            idempotency_key=record.idempotency_key,
            delivery=view.delivery,
            events=view.events,
            suppressed=view.suppressed,
        )


class Cancelled(_Body):
    id: str = Field(pattern=r"^[0-9a-f]{24}$")
    status: Literal["cancelled"] = "cancelled"


class Health(_Body):
    status: Literal["ok"] = "ok"


class Ready(_Body):
    ready: bool
    beanstalkd: str = Field(description="ok, or why it did not answer")
    mongodb: str = Field(description="ok, or why it did not answer")
