"""Every mail the model accepts, every adapter can carry (or refuses as UnsupportedByVendor).

A seeded random generator makes many accepted mails at the edges of what the model allows
(SMTPUTF8 and IDN addresses, display names with commas, quotes and non-ASCII, Unicode headers,
limits at their maximum) and feeds each through every adapter's request builder, with no
network: the MIME builder as SMTP and SES raw use it, SES ``SendEmail`` (Simple and Raw, checked
against botocore's own parameter validation), Mailgun's multipart form, SparkPost's and Brevo's
JSON. Anything but a built request or UnsupportedByVendor is a mail that would fail, or go out,
depending on where round robin starts it.
"""

from __future__ import annotations

import contextlib
import email as email_lib
import json
import random
import string
from email import policy
from email.message import EmailMessage
from typing import Any

import botocore.session
import httpx
import pytest
from botocore.validate import validate_parameters
from pydantic import SecretStr

from mailer.config import AmazonSettings, MailgunSettings, SendinblueSettings, SparkpostSettings
from mailer.errors import EmailValidationError, UnsupportedByVendor
from mailer.models import MAIL_ID_HEADER, METADATA_HEADER, Email, parse_email
from mailer.vendors.amazon import AmazonVendor
from mailer.vendors.mailgun import MailgunVendor
from mailer.vendors.mime import (
    build_message,
    envelope_addr_spec,
    message_bytes,
    metadata_headers,
    needs_smtputf8,
)
from mailer.vendors.sendinblue import SendinblueVendor
from mailer.vendors.sparkpost import SparkpostVendor

MAILS = 150
MAIL_ID = "0123456789abcdef01234567"

LOCALS = [
    "ann",
    "a.b-c_d+tag",
    "!#$%&'*+/=?^_`{|}~-",
    "x" * 64,
    "ñandú",
    "用户",
    "jörg.müller",
    "δοκιμή",
    "UPPER.Case",
]
DOMAINS = [
    "example.com",
    "bücher.example",
    "faß.de",
    "例子.广告",
    "xn--bcher-kva.example",
    "sub.d-1.example.org",
]
NAMES = [
    None,
    "",
    "Ann",
    "Doe, John",
    'Jürgen "Jo" Müller',
    "Zoë, Ltd.",
    "a\\b",
    "(comment) <angle> @at; semi: colon",
    "=?utf-8?q?not_encoded?=",
    "  spaced   out  ",
    "😀 emoji 🎉",
    "עברית العربية",
    "n" * 200,
    "ü" * 200,
    "tab\there",
]
TEXT_POOL = (
    string.ascii_letters
    + string.digits
    + " \t.,;:!?=-_'\"<>()[]{}@#$%&*+/\\|~^`"
    + "äöüßéèñçøåÆŒœ€£¥©®™…•·°±÷"
    + "\u2013\u2014\u2018\u2019\u201c\u201d\u00d7"  # dashes, curly quotes, multiplication sign
    + "αβγδεζηθλμπσωЖЗИЙКЛМНОП中文字符日本語한국어עבריתالعربية"
    + "😀🎉✉️👍🏽\u200b\u200d\u0301\ufeff"
)
HEADER_NAMES = [
    "X-Campaign",
    "List-Unsubscribe",
    "X-A",
    "In-Reply-To",
    "References",
    "Keywords",
    "X-Ünïcode-Free",
]
CONTENT_TYPES = [
    "application/pdf",
    "text/plain",
    "image/png",
    "message/rfc822",
    "multipart/mixed",
    "a/" + "b" * 127,
]


def rand_text(rng: random.Random, n: int, *, newlines: bool = False) -> str:
    pool = TEXT_POOL + ("\n\n\r\n" if newlines else "")
    return "".join(rng.choice(pool) for _ in range(n))


def rand_address(rng: random.Random) -> Any:
    addr = f"{rng.choice(LOCALS)}@{rng.choice(DOMAINS)}"
    name = rng.choice(NAMES)
    return addr if name is None else {"email": addr, "name": name}


def rand_addresses(rng: random.Random, most: int) -> list[Any]:
    return [rand_address(rng) for _ in range(rng.randint(0, most))]


def rand_metadata(rng: random.Random) -> dict[str, Any]:
    keys = ["tags", "user_id", "k", "ratio", "_x", "a-b", "K" * 64]
    values: list[Any] = [None, True, False, 0, -(2**63), 2**63 - 1, 0.5, -1e300, "", "Zoë", "x" * 100]
    return {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 6))}


def rand_mail(rng: random.Random) -> dict[str, Any]:
    header_names = [n for n in HEADER_NAMES if n.isascii()]
    # Lengths at the model's limits some of the time: a 998-character subject or header value.
    subject_len = rng.choice([1, 20, 200, 998])
    mail: dict[str, Any] = {
        "from": rand_address(rng),
        "to": [rand_address(rng) for _ in range(rng.randint(1, 4))],
        "cc": rand_addresses(rng, 3),
        "bcc": rand_addresses(rng, 2),
        "reply_to": rand_addresses(rng, 3),
        "subject": rand_text(rng, subject_len).strip() or "s",
        "headers": {
            rng.choice(header_names): rand_text(rng, rng.choice([0, 1, 30, 998]))
            for _ in range(rng.randint(0, 4))
        },
        "tags": [f"t{i}" for i in range(rng.randint(0, 10))],
        "metadata": rand_metadata(rng),
        "attachments": [
            {
                "filename": (
                    rand_text(rng, rng.choice([1, 40, 255]))
                    .replace("/", "")
                    .replace("\\", "")
                    .replace('"', "")
                    or "f"
                ),
                "content_type": rng.choice(CONTENT_TYPES),
                "content": rng.randbytes(rng.choice([0, 1, 57, 1000])),
            }
            for _ in range(rng.randint(0, 3))
        ],
    }
    body = rng.choice(["text", "html", "both"])
    if body in ("text", "both"):
        mail["text"] = rand_text(rng, rng.choice([1, 80, 2000]), newlines=True) or "t"
    if body in ("html", "both"):
        mail["html"] = "<p>" + rand_text(rng, rng.choice([1, 80, 2000]), newlines=True) + "</p>"
    return mail


def accepted_mails() -> list[Email]:
    rng = random.Random(20260315)
    mails = []
    for _ in range(MAILS):
        with contextlib.suppress(EmailValidationError):  # the model's business, not this test's
            mails.append(parse_email(rand_mail(rng)))
    assert len(mails) >= MAILS // 2, "the generator must mostly make valid mails"
    return mails


MAIL_LIST = accepted_mails()
SES_INPUT = botocore.session.get_session().get_service_model("sesv2").operation_model("SendEmail").input_shape


def check_mime(mail: Email) -> None:
    """As SMTP sends it: the message the size cap bounded, and an envelope."""
    utf8 = needs_smtputf8(mail)
    msg = build_message(mail, MAIL_ID, extra_headers=metadata_headers(mail.metadata), utf8=utf8)
    raw = message_bytes(msg)
    assert len(raw) <= mail.size(), (len(raw), mail.size())
    assert max(map(len, raw.split(b"\r\n"))) <= 998
    assert utf8 or raw.isascii()
    for addr in (mail.from_, *mail.recipients()):
        envelope_addr_spec(addr.email, utf8=utf8)
    parsed = email_lib.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["Subject"] == mail.subject
    assert parsed[MAIL_ID_HEADER] == MAIL_ID
    if mail.metadata:
        assert json.loads(parsed[METADATA_HEADER]) == mail.metadata


def check_ses(vendor: AmazonVendor, mail: Email) -> None:
    for simple_attachments in (False, True):
        vendor._simple_attachments = simple_attachments
        try:
            request = vendor._request(mail, MAIL_ID)
        except UnsupportedByVendor:
            assert needs_smtputf8(mail)
            return
        validate_parameters(request, SES_INPUT)  # raises ParamValidationError
        if "Raw" in request["Content"]:
            assert request["Content"]["Raw"]["Data"].isascii()


def check_mailgun(vendor: MailgunVendor, mail: Email) -> None:
    try:
        parts = vendor.request_parts(mail, MAIL_ID)
    except UnsupportedByVendor:
        assert len(mail.tags) > 3
        return
    httpx.Request("POST", "https://api.mailgun.net/v3/d/messages", files=parts).read()


def check_json(vendor: SparkpostVendor | SendinblueVendor, mail: Email) -> None:
    try:
        body = vendor.payload(mail, MAIL_ID)
    except UnsupportedByVendor:
        return
    json.dumps(body, allow_nan=False).encode()


@pytest.fixture(scope="module")
def vendors() -> dict[str, Any]:
    key = SecretStr("k")
    return {
        "amazon": AmazonVendor(AmazonSettings()),
        "mailgun": MailgunVendor(MailgunSettings(domain="mg.example.com", api_key=key)),
        "sparkpost": SparkpostVendor(SparkpostSettings(api_key=key)),
        "sendinblue": SendinblueVendor(SendinblueSettings(api_key=key)),
    }


def test_generated_mails_are_varied() -> None:
    """The generator reaches the cases that broke adapters, not just plain ASCII mails."""
    assert any(needs_smtputf8(m) for m in MAIL_LIST)
    assert any(not m.to[0].email.rpartition("@")[2].isascii() for m in MAIL_LIST)
    assert any(len(m.tags) > 3 for m in MAIL_LIST) and any(len(m.reply_to) > 1 for m in MAIL_LIST)
    assert any("tags" in m.metadata and m.tags for m in MAIL_LIST)
    assert any(len(m.subject) == 998 for m in MAIL_LIST)


@pytest.mark.parametrize("chunk", range(4))
def test_every_accepted_mail_builds_for_every_adapter(vendors: dict[str, Any], chunk: int) -> None:
    for mail in MAIL_LIST[chunk::4]:
        check_mime(mail)
        check_ses(vendors["amazon"], mail)
        check_mailgun(vendors["mailgun"], mail)
        check_json(vendors["sparkpost"], mail)
        check_json(vendors["sendinblue"], mail)


# --- what only some vendors cannot carry: UnsupportedByVendor, before any request ---------

BASE = {"from": "s@example.com", "to": "r@example.com", "subject": "s", "text": "t"}


def test_mailgun_takes_at_most_three_tags(vendors: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedByVendor, match="4 tags; Mailgun takes at most 3"):
        vendors["mailgun"].request_parts(parse_email({**BASE, "tags": ["a", "b", "c", "d"]}), MAIL_ID)


def test_brevo_takes_one_reply_to(vendors: dict[str, Any]) -> None:
    mail = parse_email({**BASE, "reply_to": ["a@example.com", "b@example.com"]})
    with pytest.raises(UnsupportedByVendor, match="2 reply-to addresses; Brevo takes only one"):
        vendors["sendinblue"].payload(mail, MAIL_ID)


def test_sparkpost_metadata_key_tags_with_tags(vendors: dict[str, Any]) -> None:
    mail = parse_email({**BASE, "tags": ["t"], "metadata": {"tags": "mine"}})
    with pytest.raises(UnsupportedByVendor, match="metadata key 'tags' is taken"):
        vendors["sparkpost"].payload(mail, MAIL_ID)


def test_ses_cannot_carry_a_non_ascii_local_part(vendors: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedByVendor, match="SES does not support SMTPUTF8"):
        vendors["amazon"]._request(parse_email({**BASE, "to": "ñandú@example.com"}), MAIL_ID)


def test_smtputf8_addresses_format_for_mailgun_and_sparkpost(vendors: dict[str, Any]) -> None:
    """Finding 2: the stdlib's Address raised NonASCIILocalPartDefect for these."""
    mail = parse_email({**BASE, "to": {"email": "ñandú@example.com", "name": "Ñandú, Sr."}})
    fields = dict(vendors["mailgun"].request_parts(mail, MAIL_ID))
    assert fields["to"] == (None, '"Ñandú, Sr." <ñandú@example.com>'.encode())
    body = vendors["sparkpost"].payload(mail, MAIL_ID)
    assert body["recipients"][0]["address"]["header_to"] == '"Ñandú, Sr." <ñandú@example.com>'


def test_smtp_carries_metadata_in_the_shared_header() -> None:
    mail = parse_email({**BASE, "metadata": {"order": 7, "note": "Zoë"}})
    raw = message_bytes(build_message(mail, MAIL_ID, extra_headers=metadata_headers(mail.metadata)))
    assert b'X-Mailer-Metadata: {"order":7,"note":"Zo\\u00eb"}\r\n' in raw


# --- one source of truth: the limits the producer checks are the ones the adapters enforce ---


def build_request(vendors: dict[str, Any], name: str, mail: Email) -> object:
    """The adapter's request for ``mail``, built with no network (or UnsupportedByVendor)."""
    if name == "amazon":
        return vendors["amazon"]._request(mail, MAIL_ID)
    if name == "mailgun":
        return vendors["mailgun"].request_parts(mail, MAIL_ID)
    return vendors[name].payload(mail, MAIL_ID)


def adapter_refuses(vendors: dict[str, Any], name: str, mail: Email) -> bool:
    try:
        build_request(vendors, name, mail)
    except UnsupportedByVendor:
        return True
    return False


def test_the_declared_limits_are_exactly_what_each_adapter_refuses(vendors: dict[str, Any]) -> None:
    """For every generated mail and every vendor with declared limits, the edge's check and the
    adapter agree: the producer never refuses what an adapter would carry, nor lets through
    (when every enabled vendor has declared limits) what all of them would refuse."""
    from mailer.capabilities import LIMITS

    assert set(LIMITS) == {"amazon", "mailgun", "sendinblue", "sparkpost"}  # smtp: the relay decides
    refused = dict.fromkeys(LIMITS, 0)
    for mail in MAIL_LIST:
        for name, check in LIMITS.items():
            declared = check(mail) is not None
            assert declared == adapter_refuses(vendors, name, mail), (name, mail.tags, mail.reply_to)
            refused[name] += declared
    assert all(refused.values()), refused  # each limit was reached by some generated mail


@pytest.mark.parametrize(
    ("name", "changes", "field"),
    [
        ("mailgun", {"tags": ["a", "b", "c", "d"]}, "tags"),
        ("sendinblue", {"reply_to": ["a@example.com", "b@example.com"]}, "reply_to"),
        ("sparkpost", {"tags": ["t"], "metadata": {"tags": "mine"}}, "metadata"),
        ("amazon", {"cc": "ñandú@example.com"}, "cc"),
    ],
)
def test_each_refusal_names_the_field_and_the_adapter_gives_the_same_reason(
    vendors: dict[str, Any], name: str, changes: dict[str, Any], field: str
) -> None:
    from mailer.capabilities import LIMITS

    mail = parse_email({**BASE, **changes})
    refusal = LIMITS[name](mail)
    assert refusal is not None and refusal.field == field, refusal
    with pytest.raises(UnsupportedByVendor) as info:
        build_request(vendors, name, mail)
    assert refusal.reason in info.value.reason, (refusal.reason, info.value.reason)
    assert LIMITS[name](parse_email(BASE)) is None
