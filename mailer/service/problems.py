"""Errors -> HTTP: every refusal in the one shape of ``schemas.Errors``.

The mapping is the contract clients code against: a bad mail is 422 (nothing stored), an
unknown id 404, MongoDB away 503 with Retry-After (nothing stored: retry), beanstalkd away
is no error at all (202: the mail is stored and the sweep queues it, see the routes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailer.errors import EmailValidationError, MailerError, MailNotFound, StoreError
from mailer.service.schemas import ErrorItem, Errors


class ApiError(Exception):
    """A refusal decided by the HTTP layer itself (auth, size, shape of the request)."""

    def __init__(
        self, status: int, field: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.errors = [(field, message)]
        self.headers = dict(headers or {})


def error_body(errors: Iterable[tuple[str, str]]) -> Errors:
    return Errors(errors=[ErrorItem(field=f, message=m) for f, m in errors])


def refusal(
    status: int, errors: Iterable[tuple[str, str]], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(errors).model_dump(), status_code=status, headers=dict(headers or {}))


def _location(loc: Iterable[int | str]) -> str:
    """FastAPI's ``("header", "Idempotency-Key")`` / ``("path", "mail_id")`` as one name."""
    parts = [str(p) for p in loc]
    return parts[-1] if parts else "(request)"


def install(app: FastAPI, *, retry_after_s: int) -> None:
    """Register the handlers; called once by ``create_app``."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return refusal(exc.status, exc.errors, exc.headers)

    async def invalid_mail(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EmailValidationError)
        return refusal(422, exc.errors)

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return refusal(404, [("id", f"{exc}; check the id returned when the mail was sent")])

    async def store_down(request: Request, exc: Exception) -> JSONResponse:
        message = f"{exc}. Nothing was stored by this request: retry after {retry_after_s} s"
        return refusal(503, [("(service)", message)], {"Retry-After": str(retry_after_s)})

    async def other_mailer_error(request: Request, exc: Exception) -> JSONResponse:
        return refusal(503, [("(service)", str(exc))], {"Retry-After": str(retry_after_s)})

    async def bad_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return refusal(422, [(_location(e["loc"]), str(e["msg"])) for e in exc.errors()])

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return refusal(exc.status_code, [("(request)", str(exc.detail))], exc.headers)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(EmailValidationError, invalid_mail)
    app.add_exception_handler(MailNotFound, not_found)
    app.add_exception_handler(StoreError, store_down)
    app.add_exception_handler(MailerError, other_mailer_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
