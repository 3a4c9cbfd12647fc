"""A real ``mailer-api`` app on uvicorn, on a free port, against the local services with
this test's own tube and collections (``make_settings``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from helpers import free_port, wait_until
from pydantic import SecretStr

from mailer.config import ApiSettings, Settings
from mailer.service import create_app

PLAIN_KEY = "plain-key-0123456789abcdef"
HASHED_KEY = "hashed-key-fedcba9876543210"
# sha256 of HASHED_KEY, as an operator would write it in [api] keys.
HASHED_ENTRY = "sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest()
AUTH = {"Authorization": f"Bearer {PLAIN_KEY}"}


def with_api(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with an [api] section: both test keys unless ``keys`` says otherwise."""
    changes.setdefault("keys", [SecretStr(PLAIN_KEY), SecretStr(HASHED_ENTRY)])
    return settings.model_copy(update={"api": ApiSettings(**changes)})


def _server(settings: Settings, **app: Any) -> tuple[uvicorn.Server, str]:
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, **app),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    return uvicorn.Server(config), f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def serving(settings: Settings, **app: Any) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """The app on uvicorn in this event loop (its lifespan opens the Producer); ``app``:
    ``create_app``'s options."""
    server, url = _server(settings, **app)
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done(), within=20, what="mailer-api to start")
        if task.done():
            task.result()
            raise AssertionError("mailer-api stopped during start-up")
        yield url, server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


@contextlib.contextmanager
def serving_in_thread(settings: Settings) -> Iterator[str]:
    """The app on uvicorn in a thread of its own, for synchronous clients (schemathesis)."""
    server, url = _server(settings)
    thread = threading.Thread(target=server.run, name="mailer-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("mailer-api did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(20)


@pytest.fixture
async def api_settings(settings: Settings) -> Settings:
    return with_api(settings)


@pytest.fixture
async def client(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A keep-alive client of the running app, with a valid key."""
    async with serving(api_settings) as (url, _), httpx.AsyncClient(base_url=url, headers=AUTH) as c:
        yield c
