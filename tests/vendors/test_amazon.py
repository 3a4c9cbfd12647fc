"""AmazonVendor against moto (what SES stores) and a scripted endpoint (what SES refuses)."""

from __future__ import annotations

import base64
import email
import time
from collections.abc import AsyncIterator, Iterator
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import SecretStr

from mailer.errors import (
    PermanentVendorError,
    TransientVendorError,
    UnsupportedByVendor,
    VendorAuthError,
    VendorConfigError,
    VendorThrottled,
)
from mailer.models import MAIL_ID_HEADER, Email, parse_email
from mailer.vendors.amazon import METADATA_HEADER, AmazonVendor
from mailer.vendors.base import Vendor

from .ses_doubles import (
    DROP,
    DUMMY_KEY_ID,
    DUMMY_SECRET,
    HANG,
    Answer,
    FakeSes,
    MotoSes,
    free_port,
    ses_error,
    ses_settings,
)

pytestmark = pytest.mark.timeout(30)

SENDER = "sender@example.com"


def make_email(**fields: Any) -> Email:
    data: dict[str, Any] = {
        "from": {"email": SENDER, "name": "Jürgen Müller"},
        "to": [{"email": "ann@example.net", "name": "Ann Ölund"}],
        "subject": "Grüße ✉ hello",
        "text": "plain body ü",
    }
    data.update(fields)
    return parse_email(data)


def decoded(header_value: str) -> str:
    return str(email.header.make_header(email.header.decode_header(header_value)))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoSes]:
    server = MotoSes()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def moto_vendor(moto: MotoSes) -> AsyncIterator[AmazonVendor]:
    await moto.verify(SENDER)
    async with AmazonVendor(ses_settings(moto.url)) as vendor:
        yield vendor


@pytest.fixture
async def fake() -> AsyncIterator[FakeSes]:
    server = FakeSes()
    await server.start()
    yield server
    await server.stop()


async def send_to(fake: FakeSes, mail: Email | None = None, **settings: Any) -> Any:
    async with AmazonVendor(ses_settings(fake.url, **settings)) as vendor:
        return await vendor.send(mail or make_email(), "mail-0001")


# --- moto -------------------------------------------------------------------------------


async def test_simple_text_and_html_reach_moto(moto: MotoSes, moto_vendor: AmazonVendor) -> None:
    mail = make_email(
        html="<p>html body ü</p>",
        cc=["Carl <carl@example.net>"],
        bcc=["hidden@example.org"],
        reply_to=["replies@example.com"],
        tags=["welcome"],
    )
    result = await moto_vendor.send(mail, "mail-simple-1")

    stored = await moto.sent("Message", result.message_id)
    assert stored["subject"] == "Grüße ✉ hello"
    assert stored["body"] == "<p>html body ü</p>"  # moto keeps only the HTML part of Simple content
    assert stored["source"].endswith(f"<{SENDER}>")
    dest = stored["destinations"]
    assert [a.rsplit("<")[-1].rstrip(">") for a in dest["ToAddresses"]] == ["ann@example.net"]
    assert dest["CcAddresses"] == ["Carl <carl@example.net>"]
    assert dest["BccAddresses"] == ["hidden@example.org"]
    # Non-ASCII display names travel RFC 2047 encoded, as SES requires.
    assert decoded(dest["ToAddresses"][0]) == "Ann Ölund <ann@example.net>"


async def test_custom_headers_and_attachment_go_raw_to_moto(moto: MotoSes, moto_vendor: AmazonVendor) -> None:
    # A non-ASCII header value is not allowed in Simple content, so this mail must go Raw.
    mail = make_email(
        html="<p>html body</p>",
        bcc=["hidden@example.org"],
        headers={"X-Campaign": "Frühling", "List-Unsubscribe": "<mailto:u@example.com>"},
        attachments=[
            {"filename": "report.pdf", "content_type": "application/pdf", "content": b"%PDF-1\x00\xff"}
        ],
        metadata={"order": "A-17", "price": 12.5},
    )
    result = await moto_vendor.send(mail, "mail-raw-1")

    stored = await moto.sent("RawMessage", result.message_id)
    assert "hidden@example.org" in stored["destinations"]
    msg = email.message_from_bytes(stored["raw_data"].encode(), policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["Subject"] == "Grüße ✉ hello"
    assert msg[MAIL_ID_HEADER] == "mail-raw-1"
    assert msg["X-Campaign"] == "Frühling"
    assert msg["List-Unsubscribe"] == "<mailto:u@example.com>"
    assert msg[METADATA_HEADER] == '{"price":12.5}'  # "order" fitted an SES tag, 12.5 does not
    assert msg["Bcc"] is None
    assert msg["From"].addresses[0].display_name == "Jürgen Müller"
    attachments = list(msg.iter_attachments())
    assert [(a.get_filename(), a.get_content()) for a in attachments] == [("report.pdf", b"%PDF-1\x00\xff")]
    body = msg.get_body(("plain",))
    assert body is not None and body.get_content().replace("\r\n", "\n") == "plain body ü\n"


async def test_unverified_sender_is_permanent(moto_vendor: AmazonVendor) -> None:
    # The From is part of the message: fail this mail, keep SES for the verified senders.
    with pytest.raises(PermanentVendorError, match=r"MessageRejected.*not verified"):
        await moto_vendor.send(make_email(**{"from": "stranger@unverified.example"}), "mail-unverified")


# --- request shape (scripted endpoint) --------------------------------------------------


async def test_simple_request_carries_headers_tags_and_attachments(fake: FakeSes) -> None:
    mail = make_email(
        html="<b>hi</b>",
        reply_to=["Ré <re@example.com>"],
        headers={"X-Campaign": "spring"},
        tags=["welcome", "welcome", "b2b"],
        metadata={"order": "A-17", "flag": True, "note": "has space", "welcome": "dup", "nothing": None},
        attachments=[{"filename": "a.txt", "content_type": "text/plain", "content": b"abc"}],
        to=["ann@bücher.example"],
    )
    result = await send_to(fake, mail, configuration_set="marketing")

    assert result.message_id == "fake-message-id"
    assert len(fake.requests) == 1
    req = fake.requests[0]
    assert (req.method, req.path) == ("POST", "/v2/email/outbound-emails")
    body = req.json()
    simple = body["Content"]["Simple"]
    assert simple["Subject"] == {"Data": "Grüße ✉ hello", "Charset": "UTF-8"}
    assert simple["Body"]["Text"] == {"Data": "plain body ü", "Charset": "UTF-8"}
    assert simple["Body"]["Html"] == {"Data": "<b>hi</b>", "Charset": "UTF-8"}
    headers = {h["Name"]: h["Value"] for h in simple["Headers"]}
    assert headers[MAIL_ID_HEADER] == "mail-0001"
    assert headers["X-Campaign"] == "spring"
    assert headers[METADATA_HEADER] == '{"note":"has space","welcome":"dup","nothing":null}'
    [att] = simple["Attachments"]
    assert att["FileName"] == "a.txt" and att["ContentType"] == "text/plain"
    assert base64.b64decode(att["RawContent"]) == b"abc"
    assert body["EmailTags"] == [
        {"Name": "welcome", "Value": "1"},
        {"Name": "b2b", "Value": "1"},
        {"Name": "order", "Value": "A-17"},
        {"Name": "flag", "Value": "true"},
    ]
    assert body["ConfigurationSetName"] == "marketing"
    [reply_to] = body["ReplyToAddresses"]
    assert reply_to.isascii() and decoded(reply_to) == "Ré <re@example.com>"
    # SES wants punycode domains; the Unicode display name of the sender is RFC 2047 encoded.
    assert body["Destination"] == {"ToAddresses": ["ann@xn--bcher-kva.example"]}
    sender = body["FromEmailAddress"]
    assert sender.isascii() and decoded(sender) == f"Jürgen Müller <{SENDER}>"


async def test_too_many_headers_fall_back_to_raw(fake: FakeSes) -> None:
    mail = make_email(headers={f"X-H{i}": str(i) for i in range(15)}, bcc=["b@example.org"])
    await send_to(fake, mail)

    body = fake.requests[0].json()
    assert "Simple" not in body["Content"]
    raw = base64.b64decode(body["Content"]["Raw"]["Data"])
    assert raw.isascii()
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg["X-H14"] == "14" and msg[MAIL_ID_HEADER] == "mail-0001" and msg["Bcc"] is None
    assert body["Destination"]["BccAddresses"] == ["b@example.org"]


async def test_non_ascii_local_part_is_unsupported_without_a_request(fake: FakeSes) -> None:
    with pytest.raises(UnsupportedByVendor, match="SES does not support SMTPUTF8"):
        await send_to(fake, make_email(to=["jörg@example.com"]))
    assert fake.requests == []


# --- error mapping ----------------------------------------------------------------------


ERROR_CASES = [
    (ses_error(429, "TooManyRequestsException", "Too many requests"), TransientVendorError, False),
    (ses_error(400, "LimitExceededException", "limit"), TransientVendorError, False),
    (ses_error(400, "ThrottlingException", "Maximum sending rate exceeded."), TransientVendorError, False),
    (ses_error(400, "MessageRejected", "Daily message quota exceeded."), TransientVendorError, False),
    (ses_error(500, "InternalFailure", "oops"), TransientVendorError, False),
    (ses_error(503, "ServiceUnavailable", "down"), TransientVendorError, False),
    (ses_error(504, "GatewayTimeout", "slow"), TransientVendorError, True),
    (ses_error(400, "SendingPausedException", "sending paused"), VendorAuthError, False),
    (ses_error(400, "AccountSuspendedException", "suspended"), VendorAuthError, False),
    (ses_error(400, "MailFromDomainNotVerifiedException", "MX missing"), VendorAuthError, False),
    (ses_error(404, "NotFoundException", "no such configuration set"), VendorAuthError, False),
    (ses_error(403, "UnrecognizedClientException", "bad token"), VendorAuthError, False),
    (ses_error(403, "InvalidClientTokenId", "bad key id"), VendorAuthError, False),
    (ses_error(403, "SignatureDoesNotMatch", "bad signature"), VendorAuthError, False),
    (ses_error(403, "AccessDeniedException", "not allowed"), VendorAuthError, False),
    (ses_error(400, "BadRequestException", "bad input"), PermanentVendorError, False),
    (ses_error(400, "MessageRejected", "Email address is not verified."), PermanentVendorError, False),
]


@pytest.mark.parametrize(
    ("answer", "expected", "ambiguous"),
    ERROR_CASES,
    ids=[f"{a.status}-{a.headers['x-amzn-ErrorType']}-{a.body['message'][:12]}" for a, _, _ in ERROR_CASES],
)
async def test_error_codes_map_after_exactly_one_attempt(
    fake: FakeSes, answer: Answer, expected: type[Exception], ambiguous: bool
) -> None:
    fake.action = answer
    with pytest.raises(expected) as info:
        await send_to(fake)
    assert len(fake.requests) == 1, "botocore must not retry: the router does that"
    code = answer.headers["x-amzn-ErrorType"]
    assert code in str(info.value) and answer.body["message"] in str(info.value)
    if isinstance(info.value, TransientVendorError):
        assert info.value.ambiguous is ambiguous


THROTTLES = [
    (ses_error(429, "TooManyRequestsException", "Too many requests"), VendorThrottled),
    (ses_error(400, "Throttling", "Maximum sending rate exceeded."), VendorThrottled),
    (ses_error(400, "ThrottlingException", "Maximum sending rate exceeded."), VendorThrottled),
    (ses_error(400, "MessageRejected", "Maximum sending rate exceeded."), VendorThrottled),
    # The daily quota is gone for hours: an outage of the vendor, not a short pause.
    (ses_error(400, "Throttling", "Daily message quota exceeded."), TransientVendorError),
    (ses_error(400, "MessageRejected", "Daily message quota exceeded."), TransientVendorError),
    (ses_error(503, "ServiceUnavailable", "down"), TransientVendorError),
]


@pytest.mark.parametrize(
    ("answer", "expected"),
    THROTTLES,
    ids=[f"{a.status}-{a.headers['x-amzn-ErrorType']}-{a.body['message'][:12]}" for a, _ in THROTTLES],
)
async def test_throttling_is_told_apart_from_an_outage(
    fake: FakeSes, answer: Answer, expected: type[Exception]
) -> None:
    fake.action = answer
    with pytest.raises(TransientVendorError) as info:
        await send_to(fake)
    assert type(info.value) is expected


async def test_retry_after_is_passed_on(fake: FakeSes) -> None:
    fake.action = ses_error(429, "TooManyRequestsException", "slow down", **{"Retry-After": "7"})
    with pytest.raises(TransientVendorError) as info:
        await send_to(fake)
    assert info.value.retry_after == 7.0


async def test_connection_refused_is_transient_not_ambiguous() -> None:
    started = time.monotonic()
    with pytest.raises(TransientVendorError) as info:
        async with AmazonVendor(ses_settings(f"http://127.0.0.1:{free_port()}")) as vendor:
            await vendor.send(make_email(), "mail-refused")
    assert info.value.ambiguous is False
    assert time.monotonic() - started < 3


async def test_hanging_endpoint_times_out_ambiguous_after_one_attempt(fake: FakeSes) -> None:
    fake.action = HANG
    started = time.monotonic()
    with pytest.raises(TransientVendorError) as info:
        await send_to(fake, timeout_s=0.3)
    assert info.value.ambiguous is True
    assert len(fake.requests) == 1
    assert time.monotonic() - started < 2


async def test_connection_closed_mid_response_is_ambiguous(fake: FakeSes) -> None:
    fake.action = DROP
    with pytest.raises(TransientVendorError) as info:
        await send_to(fake)
    assert info.value.ambiguous is True
    assert len(fake.requests) == 1


async def test_missing_credentials_are_an_auth_error(fake: FakeSes, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(VendorAuthError, match="credentials"):
        await send_to(fake, access_key_id=None, secret_access_key=None)
    assert fake.requests == []


# --- lifecycle and secrets --------------------------------------------------------------


async def test_secrets_stay_out_of_reprs_and_messages(fake: FakeSes) -> None:
    fake.action = ses_error(403, "SignatureDoesNotMatch", f"key {DUMMY_KEY_ID} secret {DUMMY_SECRET}")
    vendor = AmazonVendor(ses_settings(fake.url, session_token=SecretStr("tok-secret-xyz")))
    assert DUMMY_SECRET not in repr(vendor) and DUMMY_KEY_ID not in repr(vendor)
    async with vendor:
        with pytest.raises(VendorAuthError) as info:
            await vendor.send(make_email(), "mail-secret")
    text = str(info.value)
    assert DUMMY_SECRET not in text and DUMMY_KEY_ID not in text and "***" in text


async def test_lifecycle(fake: FakeSes) -> None:
    vendor = AmazonVendor(ses_settings(fake.url), name="ses-eu")
    assert isinstance(vendor, Vendor) and vendor.name == "ses-eu"
    result = await vendor.send(make_email(), "lazy-connect")  # connects on first use
    assert result.message_id == "fake-message-id"
    await vendor.close()
    await vendor.close()  # safe twice
    await vendor.connect()
    assert (await vendor.send(make_email(), "again")).message_id == "fake-message-id"
    await vendor.close()


def test_half_given_credentials_are_a_config_error() -> None:
    with pytest.raises(VendorConfigError, match="both access_key_id and secret_access_key"):
        AmazonVendor(ses_settings("http://127.0.0.1:1", secret_access_key=None))
