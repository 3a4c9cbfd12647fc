"""Fixtures that run the local vendor doubles (see http_doubles); a fresh server per test."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest

from .http_doubles import BrevoDouble, MailgunDouble, SparkpostDouble


@pytest.fixture
async def mailgun_double() -> AsyncIterator[MailgunDouble]:
    double = MailgunDouble()
    await double.start()
    yield double
    await double.stop()


@pytest.fixture
async def brevo_double() -> AsyncIterator[BrevoDouble]:
    double = BrevoDouble()
    await double.start()
    yield double
    await double.stop()


@pytest.fixture
async def sparkpost_double() -> AsyncIterator[SparkpostDouble]:
    double = SparkpostDouble()
    await double.start()
    yield double
    await double.stop()


@pytest.fixture
def refused_url() -> str:
    """A local port that was free a moment ago, so connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
