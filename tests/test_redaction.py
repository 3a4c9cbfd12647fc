"""Secrets stay out of vendor errors (hence attempts, logs, ``mailer status``) and DEBUG logs."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from pydantic import SecretStr
from vendors.http_doubles import (
    BREVO_KEY,
    MAILGUN_DOMAIN,
    MAILGUN_KEY,
    SPARKPOST_KEY,
    BrevoDouble,
    Echo,
    HttpDouble,
    MailgunDouble,
    Reply,
    SesDouble,
    SparkpostDouble,
    assert_no_secret,
    sample_email,
)
from vendors.ses_doubles import DUMMY_KEY_ID, DUMMY_SECRET, ses_settings

from mailer.config import MailgunSettings, SendinblueSettings, SparkpostSettings
from mailer.errors import TransientVendorError, VendorError
from mailer.logs import THIRD_PARTY_LOGGERS, setup_logging
from mailer.redact import MASK, Redactor
from mailer.vendors._http import HttpVendor
from mailer.vendors.amazon import AmazonVendor
from mailer.vendors.mailgun import MailgunVendor
from mailer.vendors.sendinblue import SendinblueVendor
from mailer.vendors.sparkpost import SparkpostVendor

pytestmark = pytest.mark.timeout(30)

SESSION_TOKEN = "FwoGZXIvYXdzEBYaDH-session-token-0123456789"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- the redactor ------------------------------------------------------------------------


def test_every_travelling_form_of_a_secret_is_masked() -> None:
    redactor = Redactor([SecretStr("k3y/with+chars="), None, ""], users=["bob"])
    forms = [
        "k3y/with+chars=",
        quote("k3y/with+chars=", safe=""),
        b64("api:k3y/with+chars="),
        b64("api:k3y/with+chars=").rstrip("="),
        base64.urlsafe_b64encode(b"api:k3y/with+chars=").decode(),
        b64("bob:k3y/with+chars="),
        b64("\0bob\0k3y/with+chars="),  # SMTP AUTH PLAIN
        b64("k3y/with+chars="),  # SMTP AUTH LOGIN
    ]
    for form in forms:
        assert redactor.text(f"before {form} after") == f"before {MASK} after", form
    assert redactor.text("nothing secret here") == "nothing secret here"
    assert "k3y" not in repr(redactor)


def test_a_basic_auth_header_names_its_raw_password_too() -> None:
    redactor = Redactor([f"Basic {b64('api:raw-key-123')}"])
    assert (
        redactor.text("echo: raw-key-123 and Basic " + b64("api:raw-key-123")) == f"echo: {MASK} and {MASK}"
    )


def test_an_error_is_cleaned_in_place_and_a_leaking_cause_is_cut() -> None:
    redactor = Redactor(["s3cret-value"])
    try:
        try:
            raise ValueError("upstream said s3cret-value")
        except ValueError as cause:
            raise TransientVendorError("v", "refused s3cret-value", ambiguous=True) from cause
    except TransientVendorError as exc:
        error = redactor.error(exc)
    assert error.reason == f"refused {MASK}" and str(error) == f"v: refused {MASK}"
    assert error.ambiguous is True
    assert_no_secret(("s3cret-value",), error)

    clean_cause = OSError("connection reset")
    kept = TransientVendorError("v", "reset")
    kept.__cause__ = clean_cause
    assert redactor.error(kept).__cause__ is clean_cause  # what operators debug with stays


# --- every HTTP vendor, against a double that echoes our credentials -------------------


def mailgun(base_url: str) -> MailgunVendor:
    values = {"domain": MAILGUN_DOMAIN, "api_key": MAILGUN_KEY, "base_url": base_url}
    return MailgunVendor(MailgunSettings.model_validate(values))


def brevo(base_url: str) -> SendinblueVendor:
    return SendinblueVendor(SendinblueSettings.model_validate({"api_key": BREVO_KEY, "base_url": base_url}))


def sparkpost(base_url: str) -> SparkpostVendor:
    return SparkpostVendor(SparkpostSettings.model_validate({"api_key": SPARKPOST_KEY, "base_url": base_url}))


HTTP: dict[str, tuple[Callable[[], HttpDouble], Callable[[str], HttpVendor], tuple[str, ...]]] = {
    "mailgun": (MailgunDouble, mailgun, (MAILGUN_KEY, b64(f"api:{MAILGUN_KEY}"))),
    "brevo": (BrevoDouble, brevo, (BREVO_KEY,)),
    "sparkpost": (SparkpostDouble, sparkpost, (SPARKPOST_KEY,)),
}


@pytest.fixture(params=list(HTTP))
async def http_vendor(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[HttpDouble, HttpVendor, tuple[str, ...]]]:
    make_double, make_vendor, secrets = HTTP[request.param]
    double = make_double()
    await double.start()
    async with make_vendor(double.base_url) as vendor:
        yield double, vendor, secrets
    await double.stop()


@pytest.mark.parametrize("action", [Echo(400), Echo(500), Echo(400, as_text=True), Echo(502, as_text=True)])
async def test_an_echoed_key_never_reaches_the_error(
    http_vendor: tuple[HttpDouble, HttpVendor, tuple[str, ...]], action: Echo
) -> None:
    double, vendor, secrets = http_vendor
    double.script(action)
    with pytest.raises(VendorError) as caught:
        await vendor.send(sample_email(), "echo")
    assert f"HTTP {action.status}" in str(caught.value) and MASK in caught.value.reason
    assert_no_secret(secrets, caught.value)
    for secret in secrets:
        assert secret not in caught.value.reason


async def test_a_raw_key_in_an_unreadable_success_is_masked(
    http_vendor: tuple[HttpDouble, HttpVendor, tuple[str, ...]],
) -> None:
    double, vendor, secrets = http_vendor
    double.script(Reply(200, f"<html>proxy login for {secrets[0]}</html>"))
    with pytest.raises(TransientVendorError) as caught:
        await vendor.send(sample_email(), "html")
    assert_no_secret(secrets, caught.value)


# --- SES ---------------------------------------------------------------------------------

SES_SECRETS = (DUMMY_KEY_ID, DUMMY_SECRET, SESSION_TOKEN)


@pytest.fixture
async def ses() -> AsyncIterator[tuple[SesDouble, AmazonVendor]]:
    double = SesDouble()
    await double.start()
    vendor = AmazonVendor(ses_settings(double.base_url, session_token=SecretStr(SESSION_TOKEN)))
    async with vendor:
        yield double, vendor
    await double.stop()


@pytest.mark.parametrize(("status", "code"), [(400, "BadRequestException"), (500, "InternalFailure")])
async def test_ses_error_text_with_our_keys_is_masked_with_its_cause(
    ses: tuple[SesDouble, AmazonVendor], status: int, code: str
) -> None:
    double, vendor = ses
    text = f"The security token {SESSION_TOKEN} for {DUMMY_KEY_ID} ({DUMMY_SECRET}) is bad"
    double.script(Reply(status, {"message": text}, {"x-amzn-ErrorType": code}))
    with pytest.raises(VendorError) as caught:
        await vendor.send(sample_email(attachments=[]), "ses")
    assert code in str(caught.value) and MASK in str(caught.value)
    assert_no_secret(SES_SECRETS, caught.value, vendor)


# --- logging -----------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[list[logging.LogRecord]]:
    """Collect every record at the root, and put levels back afterwards."""
    names = ["", *THIRD_PARTY_LOGGERS]
    levels = {name: logging.getLogger(name).level for name in names}
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield records
    logging.getLogger().removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_debug_is_ours_alone_unless_third_party_debug_is_asked(restore_logging: Any) -> None:
    setup_logging("DEBUG")
    assert logging.getLogger("mailer.consumer").getEffectiveLevel() == logging.DEBUG
    for name in ("botocore.endpoint", "aiobotocore", "httpx", "httpcore.http11", "aiosmtplib", "hpack"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.INFO, name
    setup_logging("WARNING")
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.WARNING
    setup_logging(logging.DEBUG, debug_third_party=True)
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.DEBUG
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("LOUD")


async def test_an_ses_send_at_debug_logs_no_credentials(
    restore_logging: list[logging.LogRecord], ses: tuple[SesDouble, AmazonVendor]
) -> None:
    setup_logging("DEBUG")
    _, vendor = ses
    await vendor.send(sample_email(attachments=[]), "debug")
    logging.getLogger("mailer.test").debug("our own DEBUG still shows")
    text = "\n".join(record.getMessage() for record in restore_logging)
    assert "our own DEBUG still shows" in text
    for secret in SES_SECRETS:
        assert secret not in text
