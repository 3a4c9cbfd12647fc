"""The console in a real browser: Debian's chromium (installed by the Makefile with apt), driven
headless by Playwright; never a browser downloaded at run time. Each page's screenshot is saved
in the test's temporary folder; with MAILER_WRITE_FIGURES=1 (``make screenshots``) the mail
view's is also copied to docs/console-mail.png."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from bson import ObjectId
from helpers import ROOT, mail, running_consumer, tube_counts, wait_all_status, wait_until
from playwright.async_api import Browser, Dialog, Page, async_playwright

from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.models import Status
from mailer.producer import Producer
from mailer.store import MailStore
from mailer.vendors.simulated import SimulatedVendor

from .conftest import PLAIN_KEY, serving

HOSTILE = """
<p id="hostile">Hostile mail</p>
<script>parent.__pwned = "script"; top.__pwned = "script"; alert("script")</script>
<img src="data:," onerror="parent.__pwned = 'onerror'; alert('onerror')">
<img src="x" onerror="parent.__pwned = 'onerror2'">
<svg onload="parent.__pwned = 'svg'"></svg>
<a id="js-link" href="javascript:parent.__pwned='link';alert('link')">click me</a>
<form action="javascript:parent.__pwned='form'"><button id="js-form">go</button></form>
"""
PRETTY = """
<div style="font-family: sans-serif; max-width: 560px; margin: 0 auto; color: #222">
  <h1 id="greeting" style="color: #2f5bea">Your order has shipped ✓</h1>
  <p>Hi Ann, order <b>#1042</b> left our warehouse today and should arrive on Thursday.</p>
  <p style="background: #f3f5fa; padding: 12px">2 &times; Notebook, 1 &times; Fountain pen</p>
  <p>Thanks for shopping with us.<br>The Shop team</p>
</div>
"""


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: 'make test' installs it (apt-get install chromium)")
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def site(api_settings: Settings) -> AsyncIterator[str]:
    async with serving(api_settings) as (url, _):
        yield url


@pytest.fixture
async def page(browser: Browser, site: str) -> AsyncIterator[Page]:
    context = await browser.new_context(base_url=site, viewport={"width": 1280, "height": 860})
    tab = await context.new_page()
    try:
        yield tab
    finally:
        await context.close()


async def sign_in(page: Page, path: str = "/") -> None:
    await page.goto(path)
    await page.fill("input[name=key]", PLAIN_KEY)
    await page.click("button[type=submit].primary")
    await page.wait_for_url(f"**{path}")


def record_dialogs(page: Page, into: list[str]) -> None:
    """Every alert/confirm/prompt is noted and dismissed (a dialog left open blocks the page)."""

    async def note(dialog: Dialog) -> None:
        into.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", note)


async def shoot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5000
    return path


async def test_sign_in_then_a_sent_mail_appears_without_a_reload(
    page: Page, api_settings: Settings, tmp_path: Path
) -> None:
    await page.goto("/")
    assert "/login" in page.url
    await shoot(page, tmp_path, "login")
    await sign_in(page)
    assert await page.locator("h1, .counts").count() > 0
    await page.evaluate("window.__sameDocument = true")
    async with Producer(api_settings) as producer:
        mail_id = await producer.send(mail(0, subject="Appears by itself"))
    row = page.locator(f'tr[data-id="{mail_id}"]')
    await row.wait_for(timeout=10_000)
    assert "Appears by itself" in await row.inner_text()
    assert await page.evaluate("window.__sameDocument") is True  # no reload happened
    await shoot(page, tmp_path, "mails")


async def test_a_mail_view_renders_its_html(page: Page, api_settings: Settings, tmp_path: Path) -> None:
    att = {"filename": "invoice-1042.pdf", "content_type": "application/pdf", "content": b"%PDF-1.4 demo"}
    async with Producer(api_settings) as producer:
        mail_id = await producer.send(
            mail(
                0,
                to="Ann Lee <ann@example.com>",
                subject="Your order has shipped",
                html=PRETTY,
                text="Hi Ann, order #1042 left our warehouse today.",
                tags=["orders"],
                attachments=[att],
            )
        )
    async with MailStore(api_settings) as store:
        try:
            async with running_consumer(api_settings, [SimulatedVendor("amazon")], concurrency=1):
                await wait_all_status(store, [mail_id], "sent", within=20)
            await sign_in(page, f"/mails/{mail_id}")
            heading = page.frame_locator("iframe.html").locator("#greeting")
            await heading.wait_for(timeout=10_000)
            assert "Your order has shipped" in await heading.inner_text()
            assert await page.locator(".badge.sim").count() >= 2  # the header and this send
            assert "Raw MIME" in await page.inner_text("main")
            await page.click("details summary")
            shot = await shoot(page, tmp_path, "mail")
            if os.environ.get("MAILER_WRITE_FIGURES"):  # `make screenshots`; `make test` leaves docs/ alone
                shutil.copyfile(shot, ROOT / "docs" / "console-mail.png")
        finally:
            await store.outbox.drop()


async def test_hostile_html_runs_nothing(
    page: Page, browser: Browser, api_settings: Settings, site: str
) -> None:
    dialogs: list[str] = []
    record_dialogs(page, dialogs)
    async with Producer(api_settings) as producer:
        mail_id = await producer.send(mail(0, subject="Hostile", html=HOSTILE))
    await sign_in(page, f"/mails/{mail_id}")
    frame = page.frame_locator("iframe.html")
    await frame.locator("#hostile").wait_for(timeout=10_000)
    await frame.locator("#js-link").click()
    await frame.locator("#js-form").click()
    await page.wait_for_timeout(300)  # bounded: let any handler that could run, run
    assert dialogs == []
    assert await page.evaluate("window.__pwned === undefined")
    inner = page.frames[1]
    assert await inner.evaluate("window.__pwned === undefined")
    assert page.url.endswith(f"/mails/{mail_id}")  # nothing navigated the console
    # Opened directly in a tab, the HTML route is just as inert (its CSP sandboxes it).
    direct = await page.context.new_page()
    record_dialogs(direct, dialogs)
    await direct.goto(f"{site}/mails/{mail_id}/html")
    await direct.wait_for_timeout(300)
    assert await direct.evaluate("window.__pwned === undefined") and dialogs == []


async def test_cancel_kick_and_vendor_reset_take_effect(
    page: Page, api_settings: Settings, tmp_path: Path
) -> None:
    b = api_settings.beanstalkd
    async with Producer(api_settings) as producer:
        waiting = await producer.send(mail(0, subject="To be cancelled", delay=600))
        buried_mail = await producer.send(mail(1, subject="Gave up", delay=600))
    async with MailStore(api_settings) as store, Beanstalk(b.host, b.port) as bs:
        # cancel
        await sign_in(page, f"/mails/{waiting}")
        await page.click("#cancel")
        await page.wait_for_url(f"**/mails/{waiting}?done=cancelled")
        assert (await store.get(waiting)).status is Status.CANCELLED
        assert await page.locator("#cancel").count() == 0

        # kick: a failed mail whose job was buried, as after its last round
        await bs.use(b.tube)
        await bs.watch(b.tube)
        await bs.ignore("default")
        job_id = await bs.put(buried_mail.encode(), delay=0, ttr=b.ttr_s)
        while (job := await bs.reserve(5)).id != job_id:
            await bs.release(job.id, delay=600)
        await bs.bury(job_id)
        await store.mails.update_one(
            {"_id": ObjectId(buried_mail)},
            {"$set": {"status": "failed", "job_id": job_id, "error": "gave up"}},
        )
        await page.goto("/queue")
        assert str(job_id) in await page.inner_text("#tube")
        await shoot(page, tmp_path, "queue")
        assert (await tube_counts(api_settings))["buried"] == 1
        await page.click("#kick-all")
        await page.wait_for_url("**/queue?done=kicked")
        counts = await tube_counts(api_settings)
        assert counts["buried"] == 0 and counts["ready"] >= 1
        assert (await bs.stats_job(job_id))["state"] == "ready"

        # vendor reset
        await store.mark_vendor("mailgun", 4_000_000_000.0, "401 the key was refused")
        await page.goto("/vendors")
        row = page.locator('tr[data-vendor="mailgun"]')
        assert "unavailable" in await row.inner_text()
        await shoot(page, tmp_path, "vendors")
        await row.locator("button").click()
        await page.wait_for_url("**/vendors?done=reset")
        await wait_until(
            lambda: page.locator('tr[data-vendor="mailgun"] .vs-available').count(), within=5, what="reset"
        )
        assert (await store.vendor_marks())["mailgun"][0] == 0.0
