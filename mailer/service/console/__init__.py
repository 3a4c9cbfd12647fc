"""The web console of ``mailer-api``, served at ``/``: mails, one mail, vendors, queue.

:func:`install` adds it to the app: the pages, their static files under ``/console-static``,
the session signer and the page shown for a refused visit (HTML, unlike the API's JSON).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from mailer.service.console.counts import SharedCounts
from mailer.service.console.routes import Refused, console, refused_page
from mailer.service.console.session import Sessions

__all__ = ["install"]

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI, *, sessions: Sessions | None = None, counts: SharedCounts | None = None) -> None:
    """Mount the console on ``app`` (which already holds ``state.settings`` and ``state.keys``)."""
    app.state.console_sessions = sessions or Sessions()
    app.state.console_counts = counts or SharedCounts()

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return refused_page(request, exc)

    app.add_exception_handler(Refused, refused)
    app.include_router(console)
    app.mount("/console-static", StaticFiles(directory=STATIC), name="console-static")
