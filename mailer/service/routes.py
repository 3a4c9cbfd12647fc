"""The /v1 routes. Each hands the mail to the app's one ``Producer``, so what the API
accepts, stores and queues is exactly what the SDK does."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.errors import EmailValidationError, EnqueueError, RecipientSuppressed
from mailer.events import delivery_view
from mailer.models import Email, Status
from mailer.producer import Producer
from mailer.service.auth import authorize
from mailer.service.body import parse_json, read_capped
from mailer.service.problems import ApiError, error_body
from mailer.service.schemas import (
    STORED_NOT_QUEUED,
    Accepted,
    BatchAccepted,
    BatchResult,
    Cancelled,
    Errors,
    Health,
    MailStatus,
    Ready,
)
from mailer.service.send_lane import IDEMPOTENCY_KEY_MAX, PATH, send_one
from mailer.service.suppressions import send_many_but_suppressed
from mailer.store import parse_mail_id

log = logging.getLogger("mailer.service")
READY_TIMEOUT_S = 2.0
REF = "#/components/schemas/{model}"


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": Errors} for code in codes}


def _json_body(ref: str) -> dict[str, Any]:
    schema = {"$ref": REF.format(model=ref)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def producer_of(request: Request) -> Producer:
    """Async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, which
    cost the send route a thread hand-off per request (about a sixth of its CPU)."""
    producer: Producer = request.app.state.producer
    return producer


ProducerDep = Annotated[Producer, Depends(producer_of)]
api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], tags=["emails"])
probes = APIRouter(prefix="/v1", tags=["probes"])


def _mail_id(value: str) -> str:
    if parse_mail_id(value) is None:
        raise ApiError(400, "id", "not a mail id: give the 24 hex characters returned when it was sent")
    return value


@api.post(
    PATH.removeprefix("/v1"),
    status_code=202,
    response_model=Accepted,
    responses=_errors(400, 401, 403, 413, 422, 503),
    openapi_extra=_json_body("Email"),
    summary="Send one mail",
)
async def send_email(
    request: Request,
    producer: ProducerDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", max_length=IDEMPOTENCY_KEY_MAX)
    ] = None,
) -> Accepted:
    """Validate, store and queue one mail (attachments' ``content`` in base64). 202 once it
    is stored; ``queued: false`` when beanstalkd did not take the job (the sweep queues it).

    The app's ``SendLane`` answers this operation before FastAPI routes it (the same
    pieces, without the per-request machinery); this route is its declaration and the
    answer when the lane is off."""
    return await send_one(request, producer, idempotency_key)


def send_route() -> APIRoute:
    """The declared ``POST /v1/emails`` (the send lane answers it, see ``send_email``)."""
    for route in api.routes:
        if isinstance(route, APIRoute) and route.path == PATH and "POST" in (route.methods or ()):
            return route
    raise LookupError(f"no POST {PATH} route")  # unreachable: declared above


def _batch_items(data: Any, max_batch: int) -> list[Any]:
    if not isinstance(data, dict):
        raise ApiError(422, "(body)", 'expected an object: {"emails": [mail, ...]}')
    for name in data:
        if name != "emails":
            raise ApiError(422, str(name), "unknown field")
    items = data.get("emails")
    if not isinstance(items, list) or not items:
        raise ApiError(422, "emails", "give a list of at least one mail")
    if len(items) > max_batch:
        raise ApiError(
            422,
            "emails",
            f"{len(items)} mails; at most {max_batch} per request ([api] max_batch)",
        )
    return items


def _accepted(mail_id: str, unqueued: set[str]) -> BatchAccepted:
    return BatchAccepted(id=mail_id, queued=mail_id not in unqueued)


@api.post(
    "/emails/batch",
    status_code=202,
    response_model=BatchResult,
    responses=_errors(400, 401, 403, 413, 422, 503),
    openapi_extra=_json_body("EmailBatch"),
    summary="Send many mails",
)
async def send_batch(request: Request, producer: ProducerDep) -> BatchResult:
    """One result per mail, in order. Valid mails are stored and queued together (one
    ``send_many``); an invalid one stores nothing and does not hold back the others."""
    settings: Settings = request.app.state.settings
    items = _batch_items(
        parse_json(await read_capped(request, settings.api.max_body_bytes)), settings.api.max_batch
    )
    results: list[BatchAccepted | Errors | None] = []
    valid: list[Email] = []
    for i, item in enumerate(items):
        try:
            valid.append(producer.validate(item))
            results.append(None)
        except EmailValidationError as exc:
            results.append(error_body((f"emails[{i}].{field}", msg) for field, msg in exc.errors))
    unqueued: set[str] = set()
    ids: list[str] = []
    refused: dict[int, RecipientSuppressed] = {}
    if valid:
        try:
            ids = await send_many_but_suppressed(producer, valid, refused)
        except EnqueueError as exc:
            ids, unqueued = exc.all_ids, set(exc.mail_ids)
    at = [i for i, r in enumerate(results) if r is None]  # a suppressed mail is refused alone
    for k, err in refused.items():
        results[at[k]] = error_body((f"emails[{at[k]}].{field}", msg) for field, msg in err.errors)
    it = iter(ids)
    done = [
        r if r is not None else BatchAccepted(id=(m := next(it)), queued=m not in unqueued) for r in results
    ]
    return BatchResult(
        results=done,
        accepted=len(ids),
        rejected=len(items) - len(ids),
        detail=f"{len(unqueued)} mail(s) {STORED_NOT_QUEUED}" if unqueued else None,
    )


@api.get(
    "/emails/{mail_id}",
    response_model=MailStatus,
    responses=_errors(400, 401, 403, 404, 422, 503),
    summary="A mail's status",
)
async def get_email(mail_id: str, producer: ProducerDep) -> MailStatus:
    """Status, attempts, vendor and timestamps (not the mail's content); delivery events."""
    record = await producer.status(_mail_id(mail_id))
    return MailStatus.of(record, await delivery_view(producer.store, record.id))


@api.delete(
    "/emails/{mail_id}",
    response_model=Cancelled,
    responses=_errors(400, 401, 403, 404, 409, 422, 503),
    summary="Cancel a mail not yet sent",
)
async def cancel_email(mail_id: str, producer: ProducerDep) -> Cancelled:
    """Cancel a mail still queued or retrying (again: 200); 409 once it is being sent or finished."""
    status = await producer.cancel(_mail_id(mail_id))
    if status is not Status.CANCELLED:
        raise ApiError(409, "id", f"the mail is {status.value}: too late to cancel it")
    return Cancelled(id=mail_id)


@probes.get("/health", response_model=Health, summary="The process is up")
async def health() -> Health:
    return Health()


async def _answers(check: Any) -> str:
    try:
        await asyncio.wait_for(check, READY_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {READY_TIMEOUT_S:g} s"
    except Exception as exc:  # any failure means "not ready", and says which
        return f"{type(exc).__name__}: {exc}"[:300]
    return "ok"


async def _server_stats(host: str, port: int) -> None:
    async with Beanstalk(host, port, connect_timeout=READY_TIMEOUT_S, command_timeout=READY_TIMEOUT_S) as bs:
        await bs.stats()


async def _beanstalkd_stats(settings: Settings) -> None:
    """Ready while any beanstalkd server answers: the producer puts a mail on the next server
    when its own is down, so one server down must not take every API instance out of a load
    balancer. The ones that do not answer are named."""
    addresses = settings.beanstalkd.addresses()
    results = await asyncio.gather(*(_answers(_server_stats(h, p)) for h, p in addresses))
    down = [f"{h}:{p} ({r})" for (h, p), r in zip(addresses, results, strict=True) if r != "ok"]
    if len(down) == len(addresses):
        raise ConnectionError("; ".join(down))
    if down:
        log.warning("beanstalkd server(s) not answering: %s", "; ".join(down))


@probes.get(
    "/ready",
    response_model=Ready,
    responses={503: {"model": Ready, "description": "beanstalkd or MongoDB does not answer"}},
    summary="beanstalkd and MongoDB answer",
)
async def ready(request: Request, producer: ProducerDep) -> Any:
    settings: Settings = request.app.state.settings
    # The vendor-status collection is tiny: reading it proves MongoDB answers queries.
    queue, mongo = await asyncio.gather(
        _answers(_beanstalkd_stats(settings)), _answers(producer.store.vendor_marks())
    )
    body = Ready(ready=queue == mongo == "ok", beanstalkd=queue, mongodb=mongo)
    return body if body.ready else JSONResponse(body.model_dump(), status_code=503)
