"""The app factory: one FastAPI app around one ``Producer``."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from mailer import __version__
from mailer.config import Settings
from mailer.models import Email
from mailer.producer import Producer
from mailer.service import problems
from mailer.service.auth import KeyRing
from mailer.service.console import install as install_console
from mailer.service.metrics import ApiMetrics, MetricsMiddleware, scrape
from mailer.service.routes import REF, api, probes, send_route
from mailer.service.send_lane import SendLane
from mailer.service.suppressions import suppressions
from mailer.service.webhooks import webhooks

DESCRIPTION = (
    "Send e-mail through mailer from any language: each mail is validated, stored in MongoDB "
    "and queued exactly as the Python SDK does. Errors are always "
    '`{"errors": [{"field", "message"}]}`.'
)


def _mail_schemas(max_batch: int) -> dict[str, Any]:
    """The request bodies, from the SDK's own model (the routes read the body themselves,
    through ``parse_email``, so FastAPI cannot infer them)."""
    email = Email.model_json_schema(by_alias=True, ref_template=REF)
    defs: dict[str, Any] = email.pop("$defs", {})
    batch = {
        "type": "object",
        "additionalProperties": False,
        "required": ["emails"],
        "properties": {
            "emails": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_batch,
                "items": {"$ref": REF.format(model="Email")},
            }
        },
    }
    return {**defs, "Email": email, "EmailBatch": batch}


def _no_telemetry() -> dict[str, Any]:
    """FastAPI's built-in OpenTelemetry hooks off (the API has its own Prometheus metrics):
    left on, they look up the global tracer and meter providers, reading the environment, on
    every request. Only FastAPI releases that have them take the argument."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


class MailerApi(FastAPI):
    """FastAPI, with the mail bodies added to the schema's components."""

    body_schemas: dict[str, Any] = {}

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = get_openapi(
                title=self.title, version=self.version, description=self.description, routes=self.routes
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(self.body_schemas)
            self.openapi_schema = schema
        return self.openapi_schema


def create_app(settings: Settings, *, producer: Producer | None = None, send_lane: bool = True) -> MailerApi:
    """The API. With ``producer`` (connected, owned by the caller) it is used as is;
    otherwise the app opens its own in its lifespan and closes it on shutdown. ``send_lane``
    off answers ``POST /v1/emails`` through FastAPI's route (the tests compare the two)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if producer is not None:
            app.state.producer = producer
            yield
            return
        async with Producer(settings) as own:
            app.state.producer = own
            yield

    app = MailerApi(
        title="mailer", version=__version__, description=DESCRIPTION, lifespan=lifespan, **_no_telemetry()
    )
    app.body_schemas = _mail_schemas(settings.api.max_batch)
    app.state.settings = settings
    app.state.keys = KeyRing(settings.api.keys)
    problems.install(app, retry_after_s=settings.api.retry_after_s)
    app.include_router(api)
    app.include_router(probes)
    app.include_router(scrape)
    app.include_router(webhooks)  # not behind [api] keys: each vendor authenticates its own way
    app.include_router(suppressions)
    install_console(app)  # the web console at /, signed in with the same [api] keys
    app.state.metrics = ApiMetrics()
    if send_lane:
        # inside the metrics, which count its answers as the route's
        app.add_middleware(SendLane, api=app, route=send_route())
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    return app
