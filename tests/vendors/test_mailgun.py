"""Mailgun adapter against the local Mailgun double, plus the error map every HTTP adapter shares."""

from __future__ import annotations

import base64
import datetime as dt
import time
from collections.abc import AsyncIterator
from email.utils import format_datetime

import httpx
import pytest

from mailer.config import MailgunSettings
from mailer.errors import (
    PermanentVendorError,
    TransientVendorError,
    UnsupportedByVendor,
    VendorAuthError,
    VendorError,
    VendorThrottled,
)
from mailer.vendors._http import default_error, parse_retry_after, transport_error
from mailer.vendors.base import Vendor
from mailer.vendors.mailgun import MailgunVendor

from .http_doubles import (
    MAILGUN_DOMAIN,
    MAILGUN_KEY,
    PDF,
    SUBJECT,
    Action,
    Drop,
    Hang,
    MailgunDouble,
    Reply,
    assert_no_secret,
    sample_email,
)

SECRETS = (MAILGUN_KEY, base64.b64encode(f"api:{MAILGUN_KEY}".encode()).decode())


def settings(base_url: str, **changes: object) -> MailgunSettings:
    values: dict[str, object] = {"domain": MAILGUN_DOMAIN, "api_key": MAILGUN_KEY, "base_url": base_url}
    return MailgunSettings.model_validate(values | changes)


@pytest.fixture
async def vendor(mailgun_double: MailgunDouble) -> AsyncIterator[MailgunVendor]:
    async with MailgunVendor(settings(mailgun_double.base_url, timeout_s=2)) as v:
        yield v


async def test_every_field_arrives_as_mailgun_form_fields(
    vendor: MailgunVendor, mailgun_double: MailgunDouble
) -> None:
    result = await vendor.send(sample_email(), "mail-0001")

    assert result.message_id == f"<20260101120000.1.abc@{MAILGUN_DOMAIN}>"
    [req] = mailgun_double.requests
    assert req.problems == []
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    f = req.fields
    assert f("from") == ["Zoë Ünïcode <sender@example.com>"]
    assert f("to") == ["Ann Example <ann@example.com>", "bob@example.com"]
    assert f("cc") == ['"Çelik, Ayşe" <cc@example.com>']
    assert f("bcc") == ["hidden@example.com"]
    assert f("subject") == [SUBJECT]
    assert f("text") == ["Hallo 👋"]
    assert f("html") == ["<p>Hallo 👋</p>"]
    assert f("h:Reply-To") == ["Support <support@example.com>"]
    assert f("h:X-Campaign") == ["spring"]
    assert f("h:X-Mailer-Id") == ["mail-0001"]
    assert (f("v:user_id"), f("v:plan"), f("v:trial"), f("v:ref")) == (["42"], ["pro"], ["true"], ["null"])
    assert f("o:tag") == ["welcome", "onboarding"]
    [attachment] = [p for p in req.form() if p.name == "attachment"]
    assert (attachment.filename, attachment.content_type, attachment.value) == (
        "Bericht-ä.pdf",
        "application/pdf",
        PDF,
    )


async def test_a_mail_without_attachments_is_still_multipart(
    vendor: MailgunVendor, mailgun_double: MailgunDouble
) -> None:
    await vendor.send(sample_email(attachments=[], cc=[], bcc=[], reply_to=[], html=None), "m")
    [req] = mailgun_double.requests
    assert req.problems == []
    assert req.headers["content-type"].startswith("multipart/form-data")
    assert {p.name for p in req.form()} == {
        "from", "to", "subject", "text", "h:X-Campaign", "h:X-Mailer-Id",
        "v:user_id", "v:plan", "v:trial", "v:ref", "o:tag",
    }  # fmt: skip


async def test_more_than_three_tags_is_refused_before_any_request(
    vendor: MailgunVendor, mailgun_double: MailgunDouble
) -> None:
    with pytest.raises(UnsupportedByVendor, match="4 tags; Mailgun takes at most 3"):
        await vendor.send(sample_email(tags=["a", "b", "c", "d"]), "m")
    assert mailgun_double.requests == []


async def test_one_client_and_one_kept_alive_connection_serve_many_sends(
    vendor: MailgunVendor, mailgun_double: MailgunDouble
) -> None:
    client = vendor._client
    ids = [(await vendor.send(sample_email(), f"m{i}")).message_id for i in range(3)]
    assert vendor._client is client
    assert len(set(ids)) == 3
    assert len({r.connection for r in mailgun_double.requests}) == 1


ERRORS: list[tuple[Action, type[VendorError], float | None, bool]] = [
    (Reply(400, {"message": "'to' parameter is not a valid address"}), PermanentVendorError, None, False),
    (Reply(413, {"message": "request entity too large"}), PermanentVendorError, None, False),
    (Reply(401, "Forbidden"), VendorAuthError, None, False),
    (Reply(402, {"message": "Domain disabled: billing"}), VendorAuthError, None, False),
    (Reply(403, {"message": "Domain is not allowed to send"}), VendorAuthError, None, False),
    (Reply(404, {"message": "Domain not found: mg.example.com"}), VendorAuthError, None, False),
    (Reply(429, {"message": "Too many requests"}, {"Retry-After": "7"}), VendorThrottled, 7.0, False),
    (Reply(500, {"message": "Internal Server Error"}), TransientVendorError, None, False),
    (Drop(), TransientVendorError, None, True),
]


@pytest.mark.parametrize(("action", "error", "retry_after", "ambiguous"), ERRORS)
async def test_vendor_answers_map_to_error_classes(
    vendor: MailgunVendor,
    mailgun_double: MailgunDouble,
    action: Action,
    error: type[VendorError],
    retry_after: float | None,
    ambiguous: bool,
) -> None:
    mailgun_double.script(action)
    with pytest.raises(error) as caught:
        await vendor.send(sample_email(), "m")
    assert type(caught.value) is error
    if isinstance(action, Reply):
        assert f"HTTP {action.status}" in str(caught.value)
        text = action.body if isinstance(action.body, str) else action.body["message"]
        assert text in str(caught.value)
    if isinstance(caught.value, TransientVendorError):
        assert (caught.value.retry_after, caught.value.ambiguous) == (retry_after, ambiguous)
    assert_no_secret(SECRETS, caught.value, vendor)
    assert (await vendor.send(sample_email(), "again")).message_id  # the adapter recovers


async def test_a_vendor_that_never_answers_times_out_as_ambiguous(mailgun_double: MailgunDouble) -> None:
    mailgun_double.script(Hang())
    async with MailgunVendor(settings(mailgun_double.base_url, timeout_s=0.3)) as vendor:
        started = time.monotonic()
        with pytest.raises(TransientVendorError, match=r"timed out.*after sending") as caught:
            await vendor.send(sample_email(), "m")
        assert 0.25 < time.monotonic() - started < 2
        assert caught.value.ambiguous is True
        assert_no_secret(SECRETS, caught.value)
        assert (await vendor.send(sample_email(), "again")).message_id


async def test_a_refused_connection_is_transient_and_not_ambiguous(refused_url: str) -> None:
    async with MailgunVendor(settings(refused_url)) as vendor:
        with pytest.raises(TransientVendorError, match="ConnectError") as caught:
            await vendor.send(sample_email(), "m")
    assert caught.value.ambiguous is False
    assert_no_secret(SECRETS, caught.value)


async def test_the_double_refuses_a_wrong_key_and_an_unknown_domain(mailgun_double: MailgunDouble) -> None:
    wrong = "key-wrong-0000000000000000"
    async with MailgunVendor(settings(mailgun_double.base_url, api_key=wrong)) as vendor:
        with pytest.raises(VendorAuthError, match="HTTP 401: Forbidden") as caught:
            await vendor.send(sample_email(), "m")
        assert_no_secret((wrong,), caught.value, vendor)
    async with MailgunVendor(settings(mailgun_double.base_url, domain="other.example.com")) as vendor:
        with pytest.raises(VendorAuthError, match=r"HTTP 404: Domain not found.*check the domain"):
            await vendor.send(sample_email(), "m")


async def test_success_without_an_id_is_ambiguous(
    vendor: MailgunVendor, mailgun_double: MailgunDouble
) -> None:
    mailgun_double.script(Reply(200, "<html>Welcome to nginx</html>"))
    with pytest.raises(TransientVendorError, match="without a JSON object") as caught:
        await vendor.send(sample_email(), "m")
    assert caught.value.ambiguous is True


async def test_lifecycle_and_repr(mailgun_double: MailgunDouble) -> None:
    vendor = MailgunVendor(settings(mailgun_double.base_url), name="mailgun-eu")
    assert isinstance(vendor, Vendor)
    assert vendor.name == "mailgun-eu"
    with pytest.raises(RuntimeError, match="not connected"):
        await vendor.send(sample_email(), "m")
    await vendor.connect()
    await vendor.connect()  # idempotent: still one client
    assert "connected" in repr(vendor) and MAILGUN_DOMAIN in repr(vendor)
    assert_no_secret(SECRETS, vendor)
    await vendor.close()
    await vendor.close()
    assert mailgun_double.requests == []


# --- the shared map in mailer.vendors._http ----------------------------------------------


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(format_datetime(now + dt.timedelta(seconds=90), usegmt=True), now) == 90.0
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now) == 0.0  # in the past
    assert [parse_retry_after(v, now) for v in (None, "", "soon", "nan", "-5")] == [
        None,
        None,
        None,
        None,
        0.0,
    ]


async def test_retry_after_as_an_http_date_reaches_the_error(
    vendor: MailgunVendor, mailgun_double: MailgunDouble
) -> None:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
    mailgun_double.script(Reply(503, "busy", {"Retry-After": format_datetime(when, usegmt=True)}))
    with pytest.raises(TransientVendorError) as caught:
        await vendor.send(sample_email(), "m")
    assert caught.value.retry_after is not None and 55 <= caught.value.retry_after <= 60


@pytest.mark.parametrize(
    ("exc", "ambiguous"),
    [
        (httpx.ConnectError("refused"), False),
        (httpx.ConnectTimeout("slow connect"), False),
        (httpx.PoolTimeout("no free connection"), False),
        (httpx.ReadTimeout("timed out"), True),
        (httpx.WriteTimeout("timed out"), True),
        (httpx.ReadError("reset"), True),
        (httpx.RemoteProtocolError("Server disconnected"), True),
    ],
)
def test_transport_failures_say_whether_the_request_left(exc: httpx.RequestError, ambiguous: bool) -> None:
    error = transport_error("v", exc)
    assert isinstance(error, TransientVendorError)
    assert error.ambiguous is ambiguous
    assert type(exc).__name__ in str(error)


def test_default_status_map() -> None:
    def kind(status: int) -> str:
        err = default_error("v", status, f"HTTP {status}: x", None)
        return type(err).__name__ + ("?" if getattr(err, "ambiguous", False) else "")

    assert [kind(s) for s in (400, 409, 413, 422)] == ["PermanentVendorError"] * 4
    assert [kind(s) for s in (301, 401, 403, 404, 405)] == ["VendorAuthError"] * 5
    assert kind(429) == "VendorThrottled"  # slow down, not an outage
    assert [kind(s) for s in (500, 502, 503)] == ["TransientVendorError"] * 3
    assert kind(504) == "TransientVendorError?"
    assert isinstance(transport_error("v", httpx.UnsupportedProtocol("ftp")), VendorAuthError)
