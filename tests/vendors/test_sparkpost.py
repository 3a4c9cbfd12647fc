"""SparkPost adapter against the local SparkPost double."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator

import pytest

from mailer.config import SparkpostSettings
from mailer.errors import (
    PermanentVendorError,
    TransientVendorError,
    UnsupportedByVendor,
    VendorAuthError,
    VendorError,
    VendorThrottled,
)
from mailer.vendors.base import Vendor
from mailer.vendors.sparkpost import SparkpostVendor

from .http_doubles import (
    PDF,
    SPARKPOST_KEY,
    SUBJECT,
    Action,
    Drop,
    Hang,
    Reply,
    SparkpostDouble,
    assert_no_secret,
    sample_email,
)

SECRETS = (SPARKPOST_KEY,)
TO_HEADER = "Ann Example <ann@example.com>, bob@example.com"


def settings(base_url: str, **changes: object) -> SparkpostSettings:
    return SparkpostSettings.model_validate({"api_key": SPARKPOST_KEY, "base_url": base_url} | changes)


@pytest.fixture
async def vendor(sparkpost_double: SparkpostDouble) -> AsyncIterator[SparkpostVendor]:
    async with SparkpostVendor(settings(sparkpost_double.base_url, timeout_s=2)) as v:
        yield v


async def test_every_field_arrives_as_a_transmission(
    vendor: SparkpostVendor, sparkpost_double: SparkpostDouble
) -> None:
    result = await vendor.send(sample_email(), "mail-0001")

    assert result.message_id == "11668787484954"
    [req] = sparkpost_double.requests
    assert req.problems == []
    assert req.headers["authorization"] == SPARKPOST_KEY
    assert SUBJECT.encode() in req.body
    assert req.json() == {
        "recipients": [
            {"address": {"email": "ann@example.com", "name": "Ann Example", "header_to": TO_HEADER}},
            {"address": {"email": "bob@example.com", "header_to": TO_HEADER}},
            {"address": {"email": "cc@example.com", "name": "Çelik, Ayşe", "header_to": TO_HEADER}},
            {"address": {"email": "hidden@example.com", "header_to": TO_HEADER}},
        ],
        "content": {
            "from": {"email": "sender@example.com", "name": "Zoë Ünïcode"},
            "subject": SUBJECT,
            "text": "Hallo 👋",
            "html": "<p>Hallo 👋</p>",
            "reply_to": "Support <support@example.com>",
            "headers": {
                "X-Campaign": "spring",
                "X-Mailer-Id": "mail-0001",
                "Cc": '"Çelik, Ayşe" <cc@example.com>',
            },
            "attachments": [
                {"name": "Bericht-ä.pdf", "type": "application/pdf", "data": base64.b64encode(PDF).decode()}
            ],
        },
        "metadata": {
            "user_id": 42,
            "plan": "pro",
            "trial": True,
            "ref": None,
            "tags": ["welcome", "onboarding"],
        },
    }


async def test_optional_parts_are_left_out(
    vendor: SparkpostVendor, sparkpost_double: SparkpostDouble
) -> None:
    mail = sample_email(cc=[], bcc=[], reply_to=[], tags=[], metadata={}, attachments=[], html=None)
    await vendor.send(mail, "m")
    body = sparkpost_double.requests[0].json()
    assert "metadata" not in body and len(body["recipients"]) == 2
    assert body["content"]["headers"] == {"X-Campaign": "spring", "X-Mailer-Id": "m"}
    assert not {"reply_to", "attachments", "html"} & body["content"].keys()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metadata": {"tags": "mine"}}, "metadata key 'tags' is taken"),
    ],
)
async def test_what_sparkpost_cannot_carry_is_refused_before_any_request(
    vendor: SparkpostVendor, sparkpost_double: SparkpostDouble, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(UnsupportedByVendor, match=message):
        await vendor.send(sample_email(**changes), "m")
    assert sparkpost_double.requests == []


async def test_metadata_key_tags_is_fine_without_tags(
    vendor: SparkpostVendor, sparkpost_double: SparkpostDouble
) -> None:
    await vendor.send(sample_email(tags=[], metadata={"tags": "mine"}), "m")
    assert sparkpost_double.requests[0].json()["metadata"] == {"tags": "mine"}


async def test_zero_accepted_recipients_is_a_permanent_failure(
    vendor: SparkpostVendor, sparkpost_double: SparkpostDouble
) -> None:
    results = {"total_rejected_recipients": 4, "total_accepted_recipients": 0, "id": "1"}
    sparkpost_double.script(Reply(200, {"results": results}))
    with pytest.raises(PermanentVendorError, match=r"none of the recipients \(4 rejected\)"):
        await vendor.send(sample_email(), "m")


async def test_one_client_and_one_kept_alive_connection_serve_many_sends(
    vendor: SparkpostVendor, sparkpost_double: SparkpostDouble
) -> None:
    client = vendor._client
    for i in range(3):
        await vendor.send(sample_email(), f"m{i}")
    assert vendor._client is client
    assert len({r.connection for r in sparkpost_double.requests}) == 1


def sp_error(status: int, code: str, message: str, description: str = "", **headers: str) -> Reply:
    error = {"message": message, "code": code} | ({"description": description} if description else {})
    return Reply(status, {"errors": [error]}, headers)


ERRORS: list[tuple[Action, type[VendorError], float | None, bool]] = [
    (sp_error(400, "1200", "invalid params", "bad recipient"), PermanentVendorError, None, False),
    (sp_error(422, "1300", "invalid data format/type/length"), PermanentVendorError, None, False),
    (sp_error(400, "7001", "Invalid domain", "Unconfigured Sending Domain"), VendorAuthError, None, False),
    (Reply(401, {"errors": [{"message": "Unauthorized."}]}), VendorAuthError, None, False),
    (sp_error(403, "1100", "permission denied"), VendorAuthError, None, False),
    (
        sp_error(420, "2102", "Exceed Sending Limit (daily)", **{"Retry-After": "60"}),
        VendorThrottled,
        60.0,
        False,
    ),
    (sp_error(429, "1902", "Too many requests"), VendorThrottled, None, False),
    (sp_error(503, "1900", "Service Unavailable"), TransientVendorError, None, False),
    (sp_error(500, "1500", "Internal error"), TransientVendorError, None, False),
    (Drop(), TransientVendorError, None, True),
]


@pytest.mark.parametrize(("action", "error", "retry_after", "ambiguous"), ERRORS)
async def test_vendor_answers_map_to_error_classes(
    vendor: SparkpostVendor,
    sparkpost_double: SparkpostDouble,
    action: Action,
    error: type[VendorError],
    retry_after: float | None,
    ambiguous: bool,
) -> None:
    sparkpost_double.script(action)
    with pytest.raises(error) as caught:
        await vendor.send(sample_email(), "m")
    assert type(caught.value) is error
    if isinstance(action, Reply):
        first = action.body["errors"][0]
        assert f"HTTP {action.status}: {first['message']}" in str(caught.value)
        assert first.get("description", "") in str(caught.value)
    if isinstance(caught.value, TransientVendorError):
        assert (caught.value.retry_after, caught.value.ambiguous) == (retry_after, ambiguous)
    assert_no_secret(SECRETS, caught.value, vendor)
    assert (await vendor.send(sample_email(), "again")).message_id


async def test_a_vendor_that_never_answers_times_out_as_ambiguous(sparkpost_double: SparkpostDouble) -> None:
    sparkpost_double.script(Hang())
    async with SparkpostVendor(settings(sparkpost_double.base_url, timeout_s=0.3)) as vendor:
        started = time.monotonic()
        with pytest.raises(TransientVendorError, match=r"timed out.*after sending") as caught:
            await vendor.send(sample_email(), "m")
        assert 0.25 < time.monotonic() - started < 2
        assert caught.value.ambiguous is True
        assert_no_secret(SECRETS, caught.value)


async def test_a_refused_connection_is_transient_and_not_ambiguous(refused_url: str) -> None:
    async with SparkpostVendor(settings(refused_url)) as vendor:
        with pytest.raises(TransientVendorError, match="ConnectError") as caught:
            await vendor.send(sample_email(), "m")
    assert caught.value.ambiguous is False


async def test_the_double_refuses_a_wrong_key(sparkpost_double: SparkpostDouble) -> None:
    wrong = "sp-wrong-00000000000000000000"
    async with SparkpostVendor(settings(sparkpost_double.base_url, api_key=wrong)) as vendor:
        with pytest.raises(VendorAuthError, match="HTTP 401: Unauthorized") as caught:
            await vendor.send(sample_email(), "m")
        assert_no_secret((wrong,), caught.value, vendor)


async def test_lifecycle_and_repr(sparkpost_double: SparkpostDouble) -> None:
    vendor = SparkpostVendor(settings(sparkpost_double.base_url), name="sparkpost-eu")
    assert isinstance(vendor, Vendor) and vendor.name == "sparkpost-eu"
    async with vendor:
        assert_no_secret(SECRETS, vendor)
    assert "closed" in repr(vendor)
