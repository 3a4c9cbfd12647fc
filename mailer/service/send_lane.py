"""``POST /v1/emails`` without FastAPI's per-request machinery.

The single send is the route applications call most, and FastAPI's routing, dependency
solving and response validation cost it about half of the API's CPU per mail (py-spy under
50 keep-alive clients: ``solve_dependencies`` alone 19%, the send itself 15%). This pure
ASGI middleware answers exactly that method and path itself, with the same pieces the route
uses (the bearer scheme and key check, the capped body read, ``Producer.send``) and the
app's own exception handlers for every refusal, so each answer is the route's, byte for
byte (a test compares the two over the refusals and successes). The route stays declared
in FastAPI: it is the OpenAPI operation, and the app answers through it when the lane is
off (``create_app(send_lane=False)``). Anything else, including ``/v1/emails/`` and other
methods on the path, goes on to FastAPI untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from mailer.errors import EnqueueError
from mailer.producer import Producer
from mailer.service.auth import bearer, check_key
from mailer.service.body import parse_json, read_capped
from mailer.service.problems import ApiError
from mailer.service.schemas import STORED_NOT_QUEUED, Accepted

__all__ = ["IDEMPOTENCY_KEY_MAX", "PATH", "SendLane", "idempotency_key"]

PATH = "/v1/emails"
IDEMPOTENCY_KEY_MAX = 256  # the route's Header(max_length=...) says the same
Handler = Callable[[Request, Any], Response | Awaitable[Response]]


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and len(key) > IDEMPOTENCY_KEY_MAX:
        raise ApiError(422, "Idempotency-Key", f"String should have at most {IDEMPOTENCY_KEY_MAX} characters")
    return key


def with_key(data: Any, key: str | None) -> Any:
    """The Idempotency-Key header is the mail's ``idempotency_key``; given both, they must agree."""
    if key is None or not isinstance(data, dict):
        return data
    if data.get("idempotency_key", key) != key:
        raise ApiError(
            422, "Idempotency-Key", "differs from the body's idempotency_key: give one of them, or the same"
        )
    return {**data, "idempotency_key": key}


async def send_one(request: Request, producer: Producer, key: str | None) -> Accepted:
    """What both the lane and the route do once the caller is authorized."""
    data = parse_json(await read_capped(request, request.app.state.settings.api.max_body_bytes))
    try:
        mail_id = await producer.send(with_key(data, key))
    except EnqueueError as exc:
        return Accepted(id=exc.all_ids[0], queued=False, detail=STORED_NOT_QUEUED)
    return Accepted(id=mail_id, queued=True)


class SendLane:
    """Answers ``POST /v1/emails`` (see the module's docstring); the rest goes to ``app``."""

    def __init__(self, app: ASGIApp, api: FastAPI, route: BaseRoute) -> None:
        self.app = app
        self.api = api
        self.route = route  # the declared route: the metrics label the lane's answers by it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        request = Request(scope, receive)
        try:
            response: Response = JSONResponse((await self._answer(request)).model_dump(), status_code=202)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # to the server error middleware, as from the route
            answer = handler(request, exc)
            response = await answer if inspect.isawaitable(answer) else answer
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Accepted:
        check_key(request, await bearer(request))
        key = idempotency_key(request)
        producer: Producer = request.app.state.producer
        return await send_one(request, producer, key)

    def _handler(self, exc: Exception) -> Handler | None:
        """The app's handler for ``exc``, found as Starlette finds it (by the class's MRO)."""
        handlers: dict[Any, Handler] = self.api.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers and cls is not Exception:
                return handlers[cls]
        return None
