"""Brevo (Sendinblue) adapter against the local Brevo double."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator

import pytest

from mailer.config import SendinblueSettings
from mailer.errors import (
    PermanentVendorError,
    TransientVendorError,
    UnsupportedByVendor,
    VendorAuthError,
    VendorError,
    VendorThrottled,
)
from mailer.vendors.base import Vendor
from mailer.vendors.sendinblue import SendinblueVendor

from .http_doubles import (
    BREVO_KEY,
    PDF,
    SUBJECT,
    Action,
    BrevoDouble,
    Drop,
    Hang,
    Reply,
    assert_no_secret,
    sample_email,
)

SECRETS = (BREVO_KEY,)


def settings(base_url: str, **changes: object) -> SendinblueSettings:
    return SendinblueSettings.model_validate({"api_key": BREVO_KEY, "base_url": base_url} | changes)


@pytest.fixture
async def vendor(brevo_double: BrevoDouble) -> AsyncIterator[SendinblueVendor]:
    async with SendinblueVendor(settings(brevo_double.base_url, timeout_s=2)) as v:
        yield v


async def test_every_field_arrives_as_brevo_json(vendor: SendinblueVendor, brevo_double: BrevoDouble) -> None:
    result = await vendor.send(sample_email(), "mail-0001")

    assert result.message_id == "<202601011200.1@smtp-relay.mailin.fr>"
    [req] = brevo_double.requests
    assert req.problems == []
    assert req.headers["content-type"] == "application/json"
    assert req.headers["accept"] == "application/json"
    assert SUBJECT.encode() in req.body  # raw UTF-8, not \u escapes
    assert req.json() == {
        "sender": {"email": "sender@example.com", "name": "Zoë Ünïcode"},
        "to": [{"email": "ann@example.com", "name": "Ann Example"}, {"email": "bob@example.com"}],
        "cc": [{"email": "cc@example.com", "name": "Çelik, Ayşe"}],
        "bcc": [{"email": "hidden@example.com"}],
        "replyTo": {"email": "support@example.com", "name": "Support"},
        "subject": SUBJECT,
        "htmlContent": "<p>Hallo 👋</p>",
        "textContent": "Hallo 👋",
        "headers": {
            "X-Campaign": "spring",
            "X-Mailer-Id": "mail-0001",
            "X-Mailer-Metadata": '{"user_id":42,"plan":"pro","trial":true,"ref":null}',
        },
        "tags": ["welcome", "onboarding"],
        "attachment": [{"name": "Bericht-ä.pdf", "content": base64.b64encode(PDF).decode()}],
    }


async def test_metadata_header_is_ascii_json_and_optional(
    vendor: SendinblueVendor, brevo_double: BrevoDouble
) -> None:
    await vendor.send(sample_email(metadata={"city": "Zürich"}), "m1")
    await vendor.send(sample_email(metadata={}, tags=[], attachments=[], cc=[], bcc=[], reply_to=[]), "m2")
    first, second = (r.json() for r in brevo_double.requests)
    header = first["headers"]["X-Mailer-Metadata"]
    assert header.isascii() and json.loads(header) == {"city": "Zürich"}
    assert second["headers"] == {"X-Campaign": "spring", "X-Mailer-Id": "m2"}
    assert not {"cc", "bcc", "replyTo", "tags", "attachment"} & second.keys()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reply_to": ["a@example.com", "b@example.com"]}, "2 reply-to addresses; Brevo takes only one"),
    ],
)
async def test_what_brevo_cannot_carry_is_refused_before_any_request(
    vendor: SendinblueVendor, brevo_double: BrevoDouble, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(UnsupportedByVendor, match=message):
        await vendor.send(sample_email(**changes), "m")
    assert brevo_double.requests == []


async def test_one_client_and_one_kept_alive_connection_serve_many_sends(
    vendor: SendinblueVendor, brevo_double: BrevoDouble
) -> None:
    client = vendor._client
    for i in range(3):
        await vendor.send(sample_email(), f"m{i}")
    assert vendor._client is client
    assert len({r.connection for r in brevo_double.requests}) == 1


def brevo_error(status: int, code: str, message: str, **headers: str) -> Reply:
    return Reply(status, {"code": code, "message": message}, headers)


ERRORS: list[tuple[Action, type[VendorError], float | None, bool]] = [
    (brevo_error(400, "invalid_parameter", "email is not valid in to"), PermanentVendorError, None, False),
    (brevo_error(400, "missing_parameter", "subject is missing"), PermanentVendorError, None, False),
    (brevo_error(401, "unauthorized", "Key not found"), VendorAuthError, None, False),
    (brevo_error(400, "permission_denied", "Unable to send email"), VendorAuthError, None, False),
    (brevo_error(403, "not_enough_credits", "Not enough credits"), VendorAuthError, None, False),
    (brevo_error(400, "account_under_validation", "Account under validation"), VendorAuthError, None, False),
    (
        brevo_error(429, "too_many_requests", "Rate limit", **{"Retry-After": "3"}),
        VendorThrottled,
        3.0,
        False,
    ),
    (brevo_error(500, "internal_error", "Internal error"), TransientVendorError, None, False),
    (Drop(), TransientVendorError, None, True),
]


@pytest.mark.parametrize(("action", "error", "retry_after", "ambiguous"), ERRORS)
async def test_vendor_answers_map_to_error_classes(
    vendor: SendinblueVendor,
    brevo_double: BrevoDouble,
    action: Action,
    error: type[VendorError],
    retry_after: float | None,
    ambiguous: bool,
) -> None:
    brevo_double.script(action)
    with pytest.raises(error) as caught:
        await vendor.send(sample_email(), "m")
    assert type(caught.value) is error
    if isinstance(action, Reply):
        assert f"HTTP {action.status}: {action.body['code']}: {action.body['message']}" in str(caught.value)
    if isinstance(caught.value, TransientVendorError):
        assert (caught.value.retry_after, caught.value.ambiguous) == (retry_after, ambiguous)
    assert_no_secret(SECRETS, caught.value, vendor)
    assert (await vendor.send(sample_email(), "again")).message_id


async def test_a_vendor_that_never_answers_times_out_as_ambiguous(brevo_double: BrevoDouble) -> None:
    brevo_double.script(Hang())
    async with SendinblueVendor(settings(brevo_double.base_url, timeout_s=0.3)) as vendor:
        started = time.monotonic()
        with pytest.raises(TransientVendorError, match=r"timed out.*after sending") as caught:
            await vendor.send(sample_email(), "m")
        assert 0.25 < time.monotonic() - started < 2
        assert caught.value.ambiguous is True
        assert_no_secret(SECRETS, caught.value)


async def test_a_refused_connection_is_transient_and_not_ambiguous(refused_url: str) -> None:
    async with SendinblueVendor(settings(refused_url)) as vendor:
        with pytest.raises(TransientVendorError, match="ConnectError") as caught:
            await vendor.send(sample_email(), "m")
    assert caught.value.ambiguous is False


async def test_the_double_refuses_a_wrong_key(brevo_double: BrevoDouble) -> None:
    wrong = "xkeysib-wrong-000000000000"
    async with SendinblueVendor(settings(brevo_double.base_url, api_key=wrong)) as vendor:
        with pytest.raises(VendorAuthError, match="HTTP 401: unauthorized: Key not found") as caught:
            await vendor.send(sample_email(), "m")
        assert_no_secret((wrong,), caught.value, vendor)


async def test_lifecycle_and_repr(brevo_double: BrevoDouble) -> None:
    vendor = SendinblueVendor(settings(brevo_double.base_url))
    assert isinstance(vendor, Vendor) and vendor.name == "sendinblue"
    async with vendor:
        assert "connected" in repr(vendor)
        assert_no_secret(SECRETS, vendor)
    assert "closed" in repr(vendor)
