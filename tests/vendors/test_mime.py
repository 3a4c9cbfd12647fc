"""The shared MIME builder round-trips through the stdlib parser with nothing lost or leaked."""

from __future__ import annotations

import datetime as dt
import email
from email import policy
from email.message import EmailMessage, MIMEPart
from typing import Any

import pytest

from mailer.models import MAIL_ID_HEADER, Email, parse_email
from mailer.vendors.mime import (
    ascii_addr_spec,
    build_message,
    envelope_addr_spec,
    make_message_id,
    message_bytes,
    needs_smtputf8,
)


def make_email(**fields: Any) -> Email:
    data: dict[str, Any] = {
        "from": {"email": "sender@example.com", "name": 'Jürgen "Jo" Müller'},
        "to": [{"email": "ann@example.net", "name": "Zoë, Ltd."}, "bob@example.net"],
        "subject": "Grüße aus Köln ✉ " + "long subject " * 10,
        "text": "hello ü\n.dot line\nFrom the start of a line\n",
    }
    data.update(fields)
    return parse_email(data)


def round_trip(mail: Email, mail_id: str = "mail-1", **kwargs: Any) -> tuple[bytes, EmailMessage]:
    raw = message_bytes(build_message(mail, mail_id, **kwargs))
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed


def content(part: MIMEPart | None) -> Any:
    assert part is not None
    value = part.get_content()
    return value.replace("\r\n", "\n") if isinstance(value, str) else value


def test_headers_round_trip() -> None:
    mail = make_email(
        cc=["Çelik <c@example.org>"],
        bcc=["secret@example.org"],
        reply_to=["Replies <r@example.com>"],
        headers={"X-Campaign": "Frühling 2026", "List-Unsubscribe": "<mailto:u@example.com>"},
    )
    now = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    raw, msg = round_trip(mail, "mail-42", message_id="<fixed@example.com>", now=now)

    assert raw.isascii() and b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert msg["Subject"] == mail.subject
    assert [(a.display_name, a.addr_spec) for a in msg["From"].addresses] == [
        ('Jürgen "Jo" Müller', "sender@example.com")
    ]
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Zoë, Ltd.", "ann@example.net"),
        ("", "bob@example.net"),
    ]
    assert msg["Cc"].addresses[0].display_name == "Çelik"
    assert msg["Reply-To"].addresses[0].addr_spec == "r@example.com"
    assert msg["Bcc"] is None and b"secret@example.org" not in raw
    assert msg[MAIL_ID_HEADER] == "mail-42"
    assert msg["Message-ID"] == "<fixed@example.com>"
    assert msg["Date"].datetime == now
    assert msg["X-Campaign"] == "Frühling 2026"
    assert msg["List-Unsubscribe"] == "<mailto:u@example.com>"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 78


@pytest.mark.parametrize(
    ("text", "html", "expected_type"),
    [
        ("only text ü\n", None, "text/plain"),
        (None, "<p>only html ü</p>\n", "text/html"),
        ("both ü\n", "<p>both ü</p>\n", "multipart/alternative"),
    ],
)
def test_bodies(text: str | None, html: str | None, expected_type: str) -> None:
    _, msg = round_trip(make_email(text=text, html=html))
    assert msg.get_content_type() == expected_type
    if text is not None:
        assert content(msg.get_body(("plain",))) == text
    if html is not None:
        assert content(msg.get_body(("html",))) == html


def test_long_and_dotted_lines_survive() -> None:
    text = "x" * 2000 + "\n.\n..two dots\n"
    _, msg = round_trip(make_email(text=text))
    assert content(msg.get_body(("plain",))) == text


def test_attachments() -> None:
    mail = make_email(
        html="<p>see attached</p>",
        attachments=[
            {
                "filename": "Bericht für März.pdf",
                "content_type": "application/pdf",
                "content": b"%PDF\x00\xff",
            },
            {"filename": "notes.txt", "content_type": "text/plain", "content": "zeile ü\n".encode()},
            {"filename": "fwd.eml", "content_type": "message/rfc822", "content": b"Subject: x\r\n\r\nhi\r\n"},
        ],
    )
    raw, msg = round_trip(mail)
    assert raw.isascii()
    assert msg.get_content_type() == "multipart/mixed"
    assert content(msg.get_body(("plain",))) == "hello ü\n.dot line\nFrom the start of a line\n"
    assert content(msg.get_body(("html",))) == "<p>see attached</p>\n"
    got = [
        (a.get_filename(), a.get_content_type(), a.get_payload(decode=True)) for a in msg.iter_attachments()
    ]
    assert got == [
        ("Bericht für März.pdf", "application/pdf", b"%PDF\x00\xff"),
        ("notes.txt", "text/plain", "zeile ü\n".encode()),
        # message/* may not be base64-encoded, and ours is opaque bytes: sent as binary.
        ("fwd.eml", "application/octet-stream", b"Subject: x\r\n\r\nhi\r\n"),
    ]


def test_extra_headers_and_generated_ids() -> None:
    _, msg = round_trip(make_email(), extra_headers={"X-Mailer-Metadata": '{"k":1}'})
    assert msg["X-Mailer-Metadata"] == '{"k":1}'
    assert msg["Message-ID"].endswith("@example.com>")
    assert msg["Date"].datetime.tzinfo is not None
    mail = make_email()
    assert make_message_id(mail) != make_message_id(mail)


def test_idn_domains_become_punycode() -> None:
    _, msg = round_trip(make_email(to=["Zoë <zoe@bücher.example>"]))
    assert msg["To"].addresses[0].addr_spec == "zoe@xn--bcher-kva.example"
    assert msg["To"].addresses[0].display_name == "Zoë"
    assert ascii_addr_spec("a@bücher.example") == "a@xn--bcher-kva.example"


def test_non_ascii_local_part_needs_utf8() -> None:
    mail = make_email(to=["jörg@example.com"])
    assert needs_smtputf8(mail) and not needs_smtputf8(make_email())
    with pytest.raises(ValueError, match="non-ASCII local part"):
        build_message(mail, "m")
    with pytest.raises(ValueError, match="non-ASCII local part"):
        envelope_addr_spec("jörg@example.com", utf8=False)

    raw = message_bytes(build_message(mail, "m", utf8=True))
    msg = email.message_from_string(raw.decode("utf-8"), policy=policy.default)
    assert msg["To"].addresses[0].addr_spec == "jörg@example.com"
    assert msg["Subject"] == mail.subject
