"""``POST /v1/emails`` through the send lane answers exactly as FastAPI's route does.

The lane (``mailer/service/send_lane.py``) skips FastAPI's routing and dependency solving
for the most called route; these tests hold it to the route's every answer: the same
status, body and headers for each kind of success and refusal, with the lane on and off.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from helpers import mail
from pydantic import SecretStr

import mailer.service.routes
from mailer.config import Settings
from mailer.store import MailStore

from .conftest import AUTH, PLAIN_KEY, serving, with_api

ID = re.compile(r"[0-9a-f]{24}")
CAP = 4096
LISTED = "listed@example.com"
HEADERS_COMPARED = ("content-type", "www-authenticate", "retry-after", "connection")

# (name, method kwargs for httpx's post, with "headers" merged over the valid key)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("valid", {"json": mail(1)}),
    ("valid, idempotency key", {"json": mail(2), "headers": {"Idempotency-Key": "order-7"}}),
    ("idempotency key twice", {"json": mail(2), "headers": {"Idempotency-Key": "order-7"}}),
    (
        "key clashes with the body",
        {"json": mail(3, idempotency_key="a"), "headers": {"Idempotency-Key": "b"}},
    ),
    ("key too long", {"json": mail(4), "headers": {"Idempotency-Key": "k" * 257}}),
    ("no authorization", {"json": mail(5), "headers": {"Authorization": ""}}),
    ("wrong key", {"json": mail(5), "headers": {"Authorization": "Bearer nope"}}),
    ("not bearer", {"json": mail(5), "headers": {"Authorization": f"Basic {PLAIN_KEY}"}}),
    ("bearer, lower case", {"json": mail(6), "headers": {"Authorization": f"bearer {PLAIN_KEY}"}}),
    ("empty body", {"content": b"", "headers": {"Content-Type": "application/json"}}),
    ("not json", {"content": b"{nope", "headers": {"Content-Type": "application/json"}}),
    ("not an object", {"json": ["a"]}),
    ("bad field", {"json": mail(7, to="not-an-address")}),
    ("unknown field", {"json": {**mail(8), "bogus": 1}}),
    ("over the cap", {"json": mail(9, text="x" * CAP)}),
    ("suppressed recipient", {"json": mail(10, to=LISTED)}),
]


def _normal(answer: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    """Status, body (mail ids replaced: each app stores its own mails) and the headers a
    client acts on."""
    body = json.loads(ID.sub("ID", answer.text)) if answer.content else None
    return answer.status_code, body, {h: answer.headers[h] for h in HEADERS_COMPARED if h in answer.headers}


async def _answers(settings: Settings, *, send_lane: bool) -> dict[str, tuple[int, Any, dict[str, str]]]:
    async with serving(settings, send_lane=send_lane) as (url, _), httpx.AsyncClient(base_url=url) as client:
        out = {}
        for name, kwargs in CASES:
            headers = {**AUTH, **kwargs.get("headers", {})}
            headers = {k: v for k, v in headers.items() if v}
            out[name] = _normal(await client.post("/v1/emails", **{**kwargs, "headers": headers}))
        return out


@pytest.fixture
async def lane_settings(settings: Settings) -> Settings:
    capped = with_api(settings, max_body_bytes=CAP)
    async with MailStore(capped) as store:
        await store.add_suppression(LISTED, reason="test")
    return capped


async def test_the_lane_answers_as_the_route_does(lane_settings: Settings) -> None:
    lane = await _answers(lane_settings, send_lane=True)
    route = await _answers(lane_settings, send_lane=False)
    for name, _ in CASES:
        assert lane[name] == route[name], name
    # and the cases are what their names say (so the comparison covers each kind)
    statuses = {name: answer[0] for name, answer in lane.items()}
    assert statuses["valid"] == statuses["idempotency key twice"] == statuses["bearer, lower case"] == 202
    assert {statuses[n] for n in ("no authorization", "wrong key", "not bearer")} == {401}
    assert statuses["over the cap"] == 413
    assert lane["suppressed recipient"][0] == 422 and "to" in json.dumps(lane["suppressed recipient"][1])
    assert lane["key too long"][1]["errors"][0]["field"] == "Idempotency-Key"


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Any] = mailer.service.routes.send_one

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(mailer.service.routes, "send_one", counted)
    return calls


@pytest.mark.parametrize("send_lane", [True, False])
async def test_the_lane_takes_the_send_and_nothing_else(
    lane_settings: Settings, monkeypatch: pytest.MonkeyPatch, send_lane: bool
) -> None:
    calls = _counting(monkeypatch)
    async with (
        serving(lane_settings, send_lane=send_lane) as (url, _),
        httpx.AsyncClient(base_url=url, headers=AUTH) as client,
    ):
        sent = await client.post("/v1/emails", json=mail(1))
        assert sent.status_code == 202
        assert len(calls) == (0 if send_lane else 1)  # the lane answered without the route
        # Other methods and paths still go to FastAPI: 405, the trailing slash's redirect,
        # the status route, the batch route.
        assert (await client.get("/v1/emails")).status_code == 405
        assert (await client.post("/v1/emails/", json=mail(2))).status_code in (307, 404)
        assert (await client.get(f"/v1/emails/{sent.json()['id']}")).status_code == 200
        batch = await client.post("/v1/emails/batch", json={"emails": [mail(3)]})
        assert batch.status_code == 202
        metrics = (await client.get("/metrics")).text
    # The metrics count the lane's answer under the route's template, like any routed request.
    assert re.search(
        r'mailer_api_requests_total\{method="POST",route="/v1/emails",status="202"\} 1\.0', metrics
    )


async def test_a_keyless_api_serves_loopback_through_the_lane(settings: Settings) -> None:
    open_api = with_api(settings, keys=[])
    async with serving(open_api) as (url, _), httpx.AsyncClient(base_url=url) as client:
        assert (await client.post("/v1/emails", json=mail(1))).status_code == 202


async def test_a_hashed_key_is_accepted_by_the_lane(settings: Settings) -> None:
    import hashlib

    hashed = with_api(settings, keys=[SecretStr("sha256:" + hashlib.sha256(b"k-1").hexdigest())])
    async with serving(hashed) as (url, _), httpx.AsyncClient(base_url=url) as client:
        ok = await client.post("/v1/emails", json=mail(1), headers={"Authorization": "Bearer k-1"})
        bad = await client.post("/v1/emails", json=mail(1), headers={"Authorization": "Bearer k-2"})
    assert (ok.status_code, bad.status_code) == (202, 401)
