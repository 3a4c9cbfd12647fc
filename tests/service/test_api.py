"""The HTTP API against the running app (uvicorn on a free port) and the local services:
every status code, what is stored and queued behind each, the body cap, the probes."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from bson import ObjectId
from helpers import OwnBeanstalkd, mail, tube_counts, with_beanstalkd

from mailer.config import Settings
from mailer.errors import ConfigError
from mailer.models import Status
from mailer.service.app import MailerApi
from mailer.service.server import bind_address
from mailer.store import MailStore

from .conftest import AUTH, serving, with_api

BIN = Path(sys.executable).parent
MB10 = 10 * 1024 * 1024


async def stored(settings: Settings) -> int:
    async with MailStore(settings) as store:
        return await store.mails.count_documents({})


async def ready_jobs(settings: Settings) -> int:
    return (await tube_counts(settings))["ready"]


# --- POST /v1/emails ------------------------------------------------------------------------


async def test_send_then_status(client: httpx.AsyncClient, api_settings: Settings) -> None:
    sent = await client.post(
        "/v1/emails", json=mail(1, attachments=[{"filename": "a.txt", "content": "aGk="}])
    )
    assert sent.status_code == 202, sent.text
    body = sent.json()
    assert body["queued"] is True and len(body["id"]) == 24
    status = await client.get(f"/v1/emails/{body['id']}")
    assert status.status_code == 200
    record = status.json()
    assert record["id"] == body["id"] and record["status"] == "queued" and record["attempts"] == []
    assert "email" not in record  # the content is not echoed back
    assert await ready_jobs(api_settings) == 1
    async with MailStore(api_settings) as store:
        got = await store.get(body["id"])
    assert got.email.attachments[0].content == b"hi"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (mail(to="not-an-address"), "to[0].email"),
        ({**mail(), "bogus": 1}, "bogus"),
        ({k: v for k, v in mail().items() if k != "subject"}, "subject"),
        (mail(attachments=[{"filename": "a", "content": "!!notbase64"}]), "attachments[0].content"),
        (["not", "a", "mail"], "(mail)"),
    ],
)
async def test_invalid_mail_is_422_with_the_field_and_stores_nothing(
    client: httpx.AsyncClient, api_settings: Settings, body: Any, field: str
) -> None:
    r = await client.post("/v1/emails", json=body)
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["errors"]]
    assert all(e["message"] for e in r.json()["errors"])
    assert await stored(api_settings) == 0 and await ready_jobs(api_settings) == 0


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"", "(body)"),
        (b"{not json", "(body)"),
        (b"[" * 100_000, "(body)"),
        (json.dumps(mail()).replace("Hello 0", "Hello \\ud800").encode(), "subject"),
        (json.dumps(mail()).encode().replace(b"Hello 0", b"Hello \xff"), "subject"),
    ],
)
async def test_malformed_body_is_4xx_naming_where(
    client: httpx.AsyncClient, api_settings: Settings, raw: bytes, field: str
) -> None:
    r = await client.post("/v1/emails", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == [field]
    assert await stored(api_settings) == 0


async def test_idempotency_key_header_returns_the_same_id_and_queues_once(
    client: httpx.AsyncClient, api_settings: Settings
) -> None:
    first = await client.post("/v1/emails", json=mail(), headers={"Idempotency-Key": "order-42"})
    again = await client.post("/v1/emails", json=mail(), headers={"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert await stored(api_settings) == 1 and await ready_jobs(api_settings) == 1
    clash = await client.post(
        "/v1/emails", json=mail(idempotency_key="other"), headers={"Idempotency-Key": "order-42"}
    )
    assert clash.status_code == 422 and clash.json()["errors"][0]["field"] == "Idempotency-Key"


async def test_mongodb_gone_is_503_with_retry_after(api_settings: Settings) -> None:
    async with serving(api_settings) as (url, server), httpx.AsyncClient(base_url=url, headers=AUTH) as c:
        app = server.config.app
        assert isinstance(app, MailerApi)
        await app.state.producer.store.close()  # as if MongoDB went away: every operation fails
        r = await c.post("/v1/emails", json=mail())
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == str(api_settings.api.retry_after_s)
        assert "retry" in r.json()["errors"][0]["message"]
        assert (await c.get(f"/v1/emails/{ObjectId()}")).status_code == 503
        assert (await c.get("/v1/ready")).status_code == 503


async def test_beanstalkd_gone_is_202_stored_not_queued(settings: Settings, tmp_path: Path) -> None:
    own = OwnBeanstalkd(tmp_path / "binlog")
    (tmp_path / "binlog").mkdir()
    own.start()
    try:
        api_settings = with_api(with_beanstalkd(settings, port=own.port))
        async with serving(api_settings) as (url, _), httpx.AsyncClient(base_url=url, headers=AUTH) as c:
            own.kill()
            r = await c.post("/v1/emails", json=mail())
            assert r.status_code == 202, r.text
            assert r.json()["queued"] is False and "requeue sweep" in r.json()["detail"]
            async with MailStore(api_settings) as store:
                assert (await store.get(r.json()["id"])).status is Status.QUEUED
            batch = await c.post("/v1/emails/batch", json={"emails": [mail(1), mail(2)]})
            assert batch.status_code == 202
            assert [x["queued"] for x in batch.json()["results"]] == [False, False]
            ready = await c.get("/v1/ready")
            assert ready.status_code == 503
            assert ready.json()["mongodb"] == "ok" and ready.json()["beanstalkd"] != "ok"
    finally:
        own.kill()


# --- POST /v1/emails/batch ------------------------------------------------------------------


async def test_batch_one_result_per_item_in_order(client: httpx.AsyncClient, api_settings: Settings) -> None:
    r = await client.post("/v1/emails/batch", json={"emails": [mail(1), mail(2, to="nope"), mail(3)]})
    assert r.status_code == 202, r.text
    body = r.json()
    first, bad, third = body["results"]
    assert first["queued"] and third["queued"] and first["id"] != third["id"]
    assert [e["field"] for e in bad["errors"]] == ["emails[1].to[0].email"]
    assert (body["accepted"], body["rejected"]) == (2, 1)
    assert await stored(api_settings) == 2 and await ready_jobs(api_settings) == 2
    async with MailStore(api_settings) as store:
        assert (await store.get(third["id"])).email.subject == "Hello 3"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"emails": []}, "emails"),
        ({"emails": {"a": 1}}, "emails"),
        ({}, "emails"),
        ({"emails": [mail()], "extra": True}, "extra"),
        ({"emails": [mail()] * 3}, "emails"),  # over max_batch = 2
        ([mail()], "(body)"),
    ],
)
async def test_bad_batch_envelope_is_422(settings: Settings, body: Any, field: str) -> None:
    api_settings = with_api(settings, max_batch=2)
    async with serving(api_settings) as (url, _), httpx.AsyncClient(base_url=url, headers=AUTH) as c:
        r = await c.post("/v1/emails/batch", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field
    assert await stored(api_settings) == 0


# --- GET and DELETE /v1/emails/{id} ---------------------------------------------------------


async def test_unknown_id_is_404_and_not_an_id_is_400(client: httpx.AsyncClient) -> None:
    for method in ("GET", "DELETE"):
        missing = await client.request(method, f"/v1/emails/{ObjectId()}")
        assert missing.status_code == 404 and missing.json()["errors"][0]["field"] == "id"
        bad = await client.request(method, "/v1/emails/not-an-id")
        assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "id"


async def test_cancel_queued_then_again_then_409_once_sending_or_finished(
    client: httpx.AsyncClient, api_settings: Settings
) -> None:
    ids = [(await client.post("/v1/emails", json=mail(i))).json()["id"] for i in range(4)]
    cancel = await client.delete(f"/v1/emails/{ids[0]}")
    assert cancel.status_code == 200 and cancel.json() == {"id": ids[0], "status": "cancelled"}
    assert (await client.delete(f"/v1/emails/{ids[0]}")).status_code == 200
    assert (await client.get(f"/v1/emails/{ids[0]}")).json()["status"] == "cancelled"
    async with MailStore(api_settings) as store:
        for mail_id, status in zip(ids[1:], ("sending", "sent", "failed"), strict=True):
            await store.mails.update_one({"_id": ObjectId(mail_id)}, {"$set": {"status": status}})
    for mail_id, status in zip(ids[1:], ("sending", "sent", "failed"), strict=True):
        late = await client.delete(f"/v1/emails/{mail_id}")
        assert late.status_code == 409, late.text
        assert status in late.json()["errors"][0]["message"]
        assert (await client.get(f"/v1/emails/{mail_id}")).json()["status"] == status


# --- the body cap, on the wire ------------------------------------------------------------


async def _raw_request(url: str, head: str, body_chunks: list[bytes]) -> tuple[bytes, int]:
    """Send ``head`` then the chunks (stopping once the server answers); the raw answer and
    how many body bytes were written before it came."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head.encode())
    sent = 0
    answer = asyncio.ensure_future(reader.read(65536))
    for chunk in body_chunks:
        if answer.done():
            break
        writer.write(chunk)
        sent += len(chunk)
        try:
            await writer.drain()
        except ConnectionError:
            break
        # Give the answer a moment before the next chunk: writing on after the server has
        # closed would make the kernel reset the connection and drop the answer unread.
        await asyncio.wait({answer}, timeout=0.005)
    data = await asyncio.wait_for(answer, 10)
    writer.close()
    return data, sent


async def test_declared_body_over_10_mb_is_413_before_any_of_it_is_read(api_settings: Settings) -> None:
    assert api_settings.api.max_body_bytes == MB10
    async with serving(api_settings) as (url, _):
        head = (
            "POST /v1/emails HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {AUTH['Authorization'].split()[1]}\r\nContent-Length: {MB10 + 1}\r\n\r\n"
        )
        data, _ = await _raw_request(url, head, [])  # not one byte of the body is sent
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"max_body_bytes" in data
    assert await stored(api_settings) == 0


async def test_chunked_body_over_the_cap_is_413_while_it_streams(settings: Settings) -> None:
    api_settings = with_api(settings, max_body_bytes=64 * 1024)
    chunk = b"x" * 4096
    frames = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(2000)]  # 8 MB offered
    async with serving(api_settings) as (url, _):
        head = (
            "POST /v1/emails/batch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Bearer {AUTH['Authorization'].split()[1]}\r\n\r\n"
        )
        data, sent = await _raw_request(url, head, frames)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert sent < 4 * 1024 * 1024  # refused long before the whole body
    assert await stored(api_settings) == 0


# --- probes, schema, start-up ---------------------------------------------------------------


async def test_health_ready_openapi_and_docs_need_no_key(api_settings: Settings) -> None:
    async with serving(api_settings) as (url, _), httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/v1/health")).json() == {"status": "ok"}
        ready = await c.get("/v1/ready")
        assert ready.status_code == 200 and ready.json() == {
            "ready": True,
            "beanstalkd": "ok",
            "mongodb": "ok",
        }
        schema = (await c.get("/openapi.json")).json()
        assert schema["openapi"].startswith("3.1")
        assert {"/v1/emails", "/v1/emails/batch", "/v1/emails/{mail_id}", "/v1/health", "/v1/ready"} <= set(
            schema["paths"]
        )
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert "swagger" in (await c.get("/docs")).text.lower()


def test_production_refuses_to_start_without_a_key(settings: Settings) -> None:
    prod = with_api(settings, keys=[]).model_copy(update={"env": "production"})
    with pytest.raises(ConfigError, match=r"\[api\] keys"):
        bind_address(prod, None)
    assert bind_address(with_api(prod), "0.0.0.0") == "0.0.0.0"


def test_development_without_a_key_serves_loopback_only_and_says_so(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    open_settings = with_api(settings, keys=[])
    with caplog.at_level(logging.WARNING, logger="mailer.service"):
        assert bind_address(open_settings, "0.0.0.0") == "127.0.0.1"
    assert "no [api] keys" in caplog.text and "loopback" in caplog.text


def test_console_script_version_and_production_error(tmp_path: Path) -> None:
    version = subprocess.run([str(BIN / "mailer-api"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("mailer-api ")
    env = {"MAILER_ENV": "production", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [str(BIN / "mailer-api")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "[api] keys" in done.stderr


async def test_metrics_need_the_key_and_count_requests_by_route_and_status(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/v1/emails/" + "0" * 24)).status_code == 404
    assert (await client.get("/v1/health")).status_code == 200
    anonymous = await client.get("/metrics", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    page = await client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    text = page.text
    assert 'mailer_api_requests_total{method="GET",route="/v1/emails/{mail_id}",status="404"} 1.0' in text
    assert 'mailer_api_requests_total{method="GET",route="/metrics",status="401"} 1.0' in text
    assert 'mailer_api_request_seconds_count{route="/v1/health"} 1.0' in text
    assert "0" * 24 not in text  # labelled by the route's template, never the raw path
