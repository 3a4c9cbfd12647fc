"""The web console over HTTP (httpx against the real app on uvicorn): sign-in with the [api]
keys, the session cookie, CSRF refusals, keyset pagination, filters and counts, the strict
CSP of a mail's HTML, downloads. The browser tests are in test_console_browser.py."""

from __future__ import annotations

import html
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from bson import ObjectId
from helpers import FakeClock, OwnBeanstalkd, mail, tube_counts, with_beanstalkd

from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.models import Status
from mailer.producer import Producer
from mailer.service.console.routes import HTML_CSP, PAGE_CSP
from mailer.service.console.session import COOKIE, Sessions
from mailer.store import MailStore, OutboxEntry

from .conftest import PLAIN_KEY, serving, with_api

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ROW = re.compile(r'<tr data-id="([0-9a-f]{24})">')
OLDER = re.compile(r'href="/\?([^"]*after=[^"]*)" class="button" rel="next"')


def csrf_of(page: httpx.Response) -> str:
    found = CSRF.search(page.text)
    assert found is not None, page.text[:500]
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, key: str = PLAIN_KEY) -> httpx.Response:
    form = await client.get("/login")
    return await client.post("/login", data={"csrf": csrf_of(form), "key": key, "next": "/"})


@pytest.fixture
async def console(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the running app (no Authorization header: the console signs in by form)."""
    async with serving(api_settings) as (url, _), httpx.AsyncClient(base_url=url) as c:
        yield c


@pytest.fixture
async def signed_in(console: httpx.AsyncClient) -> httpx.AsyncClient:
    assert (await sign_in(console)).status_code == 303
    return console


async def send(settings: Settings, *mails: dict[str, object]) -> list[str]:
    async with Producer(settings) as producer:
        return [await producer.send(m) for m in mails]


def rows(page: httpx.Response) -> list[str]:
    assert page.status_code == 200, page.text[:500]
    return ROW.findall(page.text)


# --- sign in, sessions, CSRF ---------------------------------------------------------------


async def test_pages_need_a_signed_in_session(console: httpx.AsyncClient) -> None:
    for path in ("/", "/vendors", "/queue", "/mails/6650c0ffee0123456789abcd"):
        answer = await console.get(path)
        assert answer.status_code == 303, path
        location = answer.headers["location"]
        assert location.startswith("/login?") and parse_qs(urlsplit(location).query)["next"] == [path]


async def test_session_cookie_is_httponly_samesite_strict(console: httpx.AsyncClient) -> None:
    answer = await console.get("/login")
    cookie = answer.headers["set-cookie"].lower()
    assert cookie.startswith(f"{COOKIE}=") and "httponly" in cookie and "samesite=strict" in cookie
    assert answer.headers["content-security-policy"] == PAGE_CSP
    assert answer.headers["x-frame-options"] == "DENY"


async def test_a_wrong_key_does_not_sign_in(console: httpx.AsyncClient) -> None:
    answer = await sign_in(console, "not-the-key-0123456789")
    assert answer.status_code == 401 and "not one of [api] keys" in answer.text
    assert (await console.get("/")).status_code == 303


async def test_login_without_its_csrf_token_is_refused(console: httpx.AsyncClient) -> None:
    await console.get("/login")
    answer = await console.post("/login", data={"key": PLAIN_KEY})
    assert answer.status_code == 403 and "CSRF" in answer.text
    assert (await console.get("/")).status_code == 303


async def test_sign_in_issues_a_new_session_then_sign_out_ends_it(console: httpx.AsyncClient) -> None:
    await console.get("/login")
    before = console.cookies[COOKIE]
    answer = await sign_in(console)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    after = console.cookies[COOKIE]
    assert after != before and after.split(".")[0] != before.split(".")[0]  # a new sid
    page = await console.get("/")
    assert page.status_code == 200 and page.headers["content-security-policy"] == PAGE_CSP
    answer = await console.post("/logout", data={"csrf": csrf_of(page)})
    assert answer.status_code == 303
    assert (await console.get("/")).status_code == 303


async def test_a_forged_cookie_is_a_new_anonymous_session(console: httpx.AsyncClient) -> None:
    await sign_in(console)
    sid, _authed, issued, signature = console.cookies[COOKIE].split(".")
    console.cookies.set(COOKIE, f"{sid}.1.{issued}.{'0' * len(signature)}")
    assert (await console.get("/")).status_code == 303


async def test_actions_without_the_sessions_csrf_token_change_nothing(
    signed_in: httpx.AsyncClient, api_settings: Settings
) -> None:
    (mail_id,) = await send(api_settings, mail(0, delay=600))
    for data in ({}, {"csrf": "0" * 64}, {"csrf": Sessions().csrf(Sessions().new(authed=True))}):
        answer = await signed_in.post(f"/mails/{mail_id}/cancel", data=data)
        assert answer.status_code == 403 and "CSRF" in answer.text
    async with MailStore(api_settings) as store:
        assert (await store.get(mail_id)).status is Status.QUEUED
    page = await signed_in.get(f"/mails/{mail_id}")
    answer = await signed_in.post(f"/mails/{mail_id}/cancel", data={"csrf": csrf_of(page)})
    assert answer.status_code == 303 and answer.headers["location"].endswith("done=cancelled")
    async with MailStore(api_settings) as store:
        assert (await store.get(mail_id)).status is Status.CANCELLED


async def test_without_keys_this_machine_is_signed_in_at_once(settings: Settings) -> None:
    open_settings = with_api(settings, keys=[])
    async with serving(open_settings) as (url, _), httpx.AsyncClient(base_url=url) as c:
        page = await c.get("/")
        assert page.status_code == 200 and "Sign out" not in page.text


def test_sessions_expire_and_reject_tampering() -> None:
    clock = FakeClock(1_000_000.0)
    sessions = Sessions(clock=clock, max_age_s=60)
    session = sessions.new(authed=True)
    cookie = sessions.cookie(session)
    assert sessions.read(cookie) == session
    assert sessions.read(cookie.replace(".1.", ".0.", 1)) is None
    assert sessions.read("garbage") is None and sessions.read(None) is None
    assert Sessions(clock=clock).read(cookie) is None  # another app's secret
    assert sessions.csrf_ok(session, sessions.csrf(session))
    assert not sessions.csrf_ok(sessions.new(authed=True), sessions.csrf(session))
    clock.advance(61)
    assert sessions.read(cookie) is None


# --- the list: keyset pages, filters, counts -------------------------------------------------


async def test_pages_walk_every_mail_once_newest_first(
    signed_in: httpx.AsyncClient, api_settings: Settings
) -> None:
    async with Producer(api_settings) as producer:
        batch = await producer.send_many([mail(i) for i in range(70)])  # one queued_ts: ties
        singles = [await producer.send(mail(100 + i)) for i in range(45)]
    seen: list[str] = []
    query = ""
    for _ in range(5):
        page = await signed_in.get("/?" + query)
        seen += rows(page)
        older = OLDER.search(page.text)
        if older is None:
            break
        query = html.unescape(older.group(1))
        assert "skip" not in query
        # The cursor's count only sizes a read: a wrong one gives the same next page.
        ts, oid, _shown = parse_qs(query)["after"][0].split("_")
        for shown in ("0", "1000"):
            assert rows(await signed_in.get(f"/?after={ts}_{oid}_{shown}")) == rows(
                await signed_in.get("/?" + query)
            )
    assert len(seen) == len(set(seen)) == 115
    assert seen[:45] == list(reversed(singles))
    assert set(seen[45:]) == set(batch)
    assert seen[45:] == sorted(seen[45:], reverse=True)  # ties in _id order, newest first


async def test_filters_and_counts(signed_in: httpx.AsyncClient, api_settings: Settings) -> None:
    ann, bob, tagged = await send(
        api_settings,
        mail(0, to="ann.lee@example.com", delay=600),
        mail(1, to="bob@example.org", delay=600),
        mail(2, to="ann.ray@example.net", tags=["welcome"], delay=600),
    )
    page = await signed_in.get(f"/mails/{bob}")
    await signed_in.post(f"/mails/{bob}/cancel", data={"csrf": csrf_of(page)})

    assert rows(await signed_in.get("/?rcpt=ann.lee@example.com")) == [ann]
    assert rows(await signed_in.get("/?rcpt=ann.*")) == [tagged, ann]
    assert rows(await signed_in.get("/?rcpt=ann.")) == []  # exact unless it ends with *
    assert rows(await signed_in.get("/?tag=welcome")) == [tagged]
    assert rows(await signed_in.get("/?status=cancelled")) == [bob]
    assert rows(await signed_in.get("/?status=queued&rcpt=ann*")) == [tagged, ann]
    assert rows(await signed_in.get("/?vendor=amazon")) == []
    assert rows(await signed_in.get("/?since=2000-01-01T00:00")) == [tagged, bob, ann]
    assert rows(await signed_in.get("/?until=2000-01-01T00:00")) == []
    page = await signed_in.get("/")
    assert re.search(r"<b>2</b> queued", page.text) and re.search(r"<b>1</b> cancelled", page.text)
    assert (await signed_in.get("/?status=bogus")).status_code == 400
    assert (await signed_in.get("/?after=damaged")).status_code == 400


async def test_list_rows_never_carry_bodies(signed_in: httpx.AsyncClient, api_settings: Settings) -> None:
    await send(api_settings, mail(0, text="SECRET-BODY-TEXT", html="<b>SECRET-HTML</b>"))
    page = await signed_in.get("/")
    assert "SECRET-BODY-TEXT" not in page.text and "SECRET-HTML" not in page.text
    assert "sender@example.com" in page.text and "rcpt0@example.com" in page.text  # but the envelope


# --- one mail: its HTML under a strict CSP, downloads, actions --------------------------------


async def test_mail_html_is_served_under_the_strict_csp(
    signed_in: httpx.AsyncClient, api_settings: Settings
) -> None:
    hostile = (
        '<script>alert(1)</script><img src="https://example.com/p.png"><a href="javascript:alert(2)">x</a>'
    )
    (mail_id,) = await send(api_settings, mail(0, html=hostile))
    page = await signed_in.get(f"/mails/{mail_id}")
    assert '<iframe class="html" sandbox=""' in page.text
    assert "<script>alert(1)</script>" not in page.text  # only inside the iframe's own document
    framed = await signed_in.get(f"/mails/{mail_id}/html")
    assert framed.text == hostile
    csp = framed.headers["content-security-policy"]
    assert csp == HTML_CSP and "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in csp
    with_images = await signed_in.get(f"/mails/{mail_id}/html?images=1")
    assert "img-src data: https: http:" in with_images.headers["content-security-policy"]
    assert "script-src" not in with_images.headers["content-security-policy"]
    assert (await signed_in.get("/mails/6650c0ffee0123456789abcd")).status_code == 404
    assert (await signed_in.get("/mails/nope")).status_code == 400


async def test_attachments_and_raw_mime_download(
    signed_in: httpx.AsyncClient, api_settings: Settings
) -> None:
    content = bytes(range(256))
    att = {"filename": "räport.pdf", "content_type": "application/pdf", "content": content}
    (mail_id,) = await send(api_settings, mail(0, attachments=[att]))
    answer = await signed_in.get(f"/mails/{mail_id}/attachments/0")
    assert answer.content == content
    assert answer.headers["content-disposition"].startswith("attachment;")
    assert (await signed_in.get(f"/mails/{mail_id}/attachments/1")).status_code == 404
    assert (await signed_in.get(f"/mails/{mail_id}/raw")).status_code == 404
    async with MailStore(api_settings) as store:
        try:
            raw = b"Subject: x\r\n\r\nbody\r\n"
            await store.keep_raw([OutboxEntry(mail_id, "amazon", "sim-1", raw)])
            answer = await signed_in.get(f"/mails/{mail_id}/raw")
            assert answer.content == raw and answer.headers["content-type"].startswith("message/rfc822")
            page = await signed_in.get(f"/mails/{mail_id}")
            assert "Raw MIME" in page.text and "simulated" in page.text
        finally:
            await store.outbox.drop()


async def test_retry_now_queues_a_failed_mail_again(
    signed_in: httpx.AsyncClient, api_settings: Settings
) -> None:
    (mail_id,) = await send(api_settings, mail(0, delay=600))
    async with MailStore(api_settings) as store:
        await store.mails.update_one({"_id": ObjectId(mail_id)}, {"$set": {"status": "failed", "rounds": 5}})
        page = await signed_in.get(f"/mails/{mail_id}")
        assert 'id="retry"' in page.text and 'id="cancel"' not in page.text
        answer = await signed_in.post(f"/mails/{mail_id}/retry", data={"csrf": csrf_of(page)})
        assert answer.headers["location"].endswith("done=retried")
        record = await store.get(mail_id)
        assert record.status is Status.QUEUED and record.rounds == 0 and record.job_id is not None
        again = await signed_in.post(f"/mails/{mail_id}/retry", data={"csrf": csrf_of(page)})
        assert again.headers["location"].endswith("done=not-retryable")


async def test_vendor_reset_clears_the_mark(signed_in: httpx.AsyncClient, api_settings: Settings) -> None:
    async with MailStore(api_settings) as store:
        await store.mark_vendor("mailgun", time.time() + 600, "401 bad key")
        page = await signed_in.get("/vendors")
        assert "unavailable" in page.text and "401 bad key" in page.text
        answer = await signed_in.post("/vendors/mailgun/reset", data={"csrf": csrf_of(page)})
        assert answer.status_code == 303
        assert (await store.vendor_marks())["mailgun"][0] == 0.0
        assert (await signed_in.post("/vendors/nope/reset", data={"csrf": csrf_of(page)})).status_code == 404


async def test_retry_now_makes_a_retrying_mails_delayed_job_ready(
    signed_in: httpx.AsyncClient, api_settings: Settings
) -> None:
    (mail_id,) = await send(api_settings, mail(0, delay=600))
    b = api_settings.beanstalkd
    async with MailStore(api_settings) as store, Beanstalk(b.host, b.port) as bs:
        await bs.use(b.tube)
        job_id = await bs.put(mail_id.encode(), delay=600, ttr=b.ttr_s)
        await store.mails.update_one(
            {"_id": ObjectId(mail_id)}, {"$set": {"status": "retrying", "job_id": job_id}}
        )
        page = await signed_in.get(f"/mails/{mail_id}")
        answer = await signed_in.post(f"/mails/{mail_id}/retry", data={"csrf": csrf_of(page)})
        assert answer.headers["location"].endswith("done=kicked-retry")
        assert (await bs.stats_job(job_id))["state"] == "ready"


async def test_kick_never_moves_delayed_jobs(signed_in: httpx.AsyncClient, api_settings: Settings) -> None:
    """beanstalkd's own ``kick`` kicks delayed jobs when none is buried: the console's must not."""
    await send(api_settings, mail(0, delay=600))
    page = await signed_in.get("/queue")
    answer = await signed_in.post("/queue/kick", data={"csrf": csrf_of(page)})
    assert answer.headers["location"].endswith("done=nothing-buried")
    assert (await tube_counts(api_settings))["delayed"] == 1
    answer = await signed_in.post("/queue/kick", data={"csrf": csrf_of(page), "job": "123456789"})
    assert answer.headers["location"].endswith("done=nothing-buried")


async def test_beanstalkd_away_is_a_page_that_says_so(settings: Settings, tmp_path: Path) -> None:
    own = OwnBeanstalkd(tmp_path / "binlog")
    (tmp_path / "binlog").mkdir()
    own.start()
    try:
        app_settings = with_api(with_beanstalkd(settings, port=own.port))
        async with serving(app_settings) as (url, _), httpx.AsyncClient(base_url=url) as c:
            own.kill()
            await sign_in(c)
            page = await c.get("/queue")
            assert page.status_code == 503 and "beanstalkd" in page.text and "make services" in page.text
            assert page.headers["content-type"].startswith("text/html")
            assert (await c.get("/")).status_code == 200  # MongoDB's pages still work
    finally:
        own.kill()
