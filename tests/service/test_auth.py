"""API keys: plain and sha256-hashed, 401 with WWW-Authenticate: Bearer, loopback only
without keys, and no key in any log, repr or answer."""

from __future__ import annotations

import logging

import httpx
import pytest
from helpers import mail
from pydantic import SecretStr

from mailer.config import Settings, load_settings
from mailer.errors import ConfigError
from mailer.producer import Producer
from mailer.service import create_app
from mailer.service.auth import KeyRing

from .conftest import HASHED_ENTRY, HASHED_KEY, PLAIN_KEY, serving, with_api


async def test_plain_and_hashed_keys_are_accepted(api_settings: Settings) -> None:
    async with serving(api_settings) as (url, _), httpx.AsyncClient(base_url=url) as c:
        for key in (PLAIN_KEY, HASHED_KEY):
            r = await c.post("/v1/emails", json=mail(), headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 202, r.text
        # The hash itself is not a key: knowing the file's entry must not let anyone in.
        r = await c.post("/v1/emails", json=mail(), headers={"Authorization": f"Bearer {HASHED_ENTRY}"})
        assert r.status_code == 401


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-0123456789"},
        {"Authorization": f"Basic {PLAIN_KEY}"},
        {"Authorization": f"Bearer {PLAIN_KEY}x"},
        {"Authorization": "Bearer"},
    ],
)
async def test_missing_or_wrong_key_is_401_with_www_authenticate(
    api_settings: Settings, headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(api_settings) as (url, _), httpx.AsyncClient(base_url=url) as c:
        for method, path in (("POST", "/v1/emails"), ("POST", "/v1/emails/batch"), ("GET", "/v1/emails/x")):
            r = await c.request(method, path, json=mail(), headers=headers)
            assert r.status_code == 401, r.text
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.json()["errors"][0]["field"] == "Authorization"
            assert PLAIN_KEY not in r.text
    assert PLAIN_KEY not in caplog.text and HASHED_KEY not in caplog.text


async def test_without_keys_only_loopback_clients_are_served(settings: Settings) -> None:
    open_settings = with_api(settings, keys=[])
    app = create_app(open_settings)
    async with Producer(open_settings) as producer:
        app.state.producer = producer
        for client, expected in (
            (("127.0.0.1", 5000), 202),
            (("::1", 5000), 202),
            (("203.0.113.7", 5000), 403),
        ):
            transport = httpx.ASGITransport(app=app, client=client)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
                r = await c.post("/v1/emails", json=mail())
            assert r.status_code == expected, (client, r.text)


def test_keyring_compares_digests_and_never_shows_a_key() -> None:
    ring = KeyRing([SecretStr(PLAIN_KEY), SecretStr(HASHED_ENTRY)])
    assert ring.accepts(PLAIN_KEY) and ring.accepts(HASHED_KEY)
    assert not ring.accepts("") and not ring.accepts(PLAIN_KEY.upper()) and not ring.accepts(HASHED_ENTRY)
    assert PLAIN_KEY not in repr(ring) and HASHED_ENTRY not in repr(ring)
    assert KeyRing([]).open and not ring.open


@pytest.mark.parametrize("bad", ["short", "sha256:abc", "sha256:" + "g" * 64, " padded-key-0123456789 "])
def test_unusable_keys_stop_start_up_without_echoing_them(
    bad: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("MAILER_API__KEYS", f'["{bad}"]')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "api.keys" in str(info.value)
    assert bad.strip() not in str(info.value)
