"""What the API process does per request besides the work itself: no thread hand-off for a
dependency, no telemetry lookups (the event loop it serves on: ``tests/test_cli.py``)."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import httpx
import pytest
from helpers import mail


async def test_sending_hands_nothing_to_a_worker_thread_and_asks_no_telemetry_provider(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain ``def`` dependency runs in anyio's thread pool, and FastAPI's native telemetry
    looks up the global OpenTelemetry providers on every request: both cost the send route
    CPU per mail, and neither is needed."""
    trace = pytest.importorskip("opentelemetry.trace")  # what FastAPI's telemetry asks

    calls: list[str] = []
    real_run_sync = anyio.to_thread.run_sync

    async def counting_run_sync(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(f"thread:{getattr(func, '__name__', func)}")
        return await real_run_sync(func, *args, **kwargs)

    def provider() -> Any:
        calls.append("telemetry")
        raise AssertionError("the telemetry provider was looked up")

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting_run_sync)
    monkeypatch.setattr(trace, "get_tracer_provider", provider)
    for i in range(3):
        r = await client.post("/v1/emails", json=mail(i))
        assert r.status_code == 202, r.text
        assert (await client.get(f"/v1/emails/{r.json()['id']}")).status_code == 200
    assert calls == []
