"""The e-mail model: what is accepted, what is refused (and which field is named), delays."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest

from mailer.errors import EmailValidationError
from mailer.models import (
    MAX_EMAIL_BYTES,
    MAX_METADATA_JSON,
    MAX_RECIPIENTS,
    Address,
    Email,
    metadata_json,
    parse_email,
)

UTC = dt.UTC


def mail(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "from": "Sender <sender@example.com>",
        "to": "rcpt@example.com",
        "subject": "Hello",
        "text": "Hello there",
    }
    for key, value in changes.items():
        if value is ...:
            base.pop(key, None)
        else:
            base[key] = value
    return base


# --- valid mails -----------------------------------------------------------------------


def test_minimal_mail() -> None:
    e = parse_email(mail())
    assert e.from_ == Address(email="sender@example.com", name="Sender")
    assert e.to == [Address(email="rcpt@example.com")]
    assert e.subject == "Hello" and e.text == "Hello there" and e.html is None
    assert e.cc == e.bcc == e.reply_to == []
    assert e.priority is None and e.delay is None and e.send_at is None


def test_unicode_subject_names_and_idn_addresses() -> None:
    e = parse_email(
        mail(
            **{"from": "Jörg Müller <joerg@bücher.de>"},
            to=["δοκιμή@παράδειγμα.δοκιμή", "Łukasz Żółw <lukasz@example.com>"],
            cc="用户 <用户@例子.广告>",
            subject="Grüße 🎉 — 你好",
            html="<p>ünïcödé</p>",
        )
    )
    assert e.from_.name == "Jörg Müller"
    assert e.from_.email == "joerg@bücher.de"
    assert e.to[0].email == "δοκιμή@παράδειγμα.δοκιμή"
    assert e.to[1].name == "Łukasz Żółw"
    assert e.cc[0] == Address(email="用户@例子.广告", name="用户")
    assert e.subject == "Grüße 🎉 — 你好"
    assert str(e.from_) == "Jörg Müller <joerg@bücher.de>"


def test_punycode_domain_accepted() -> None:
    e = parse_email(mail(to="info@xn--bcher-kva.de"))
    assert e.to[0].email.endswith("de")


def test_to_as_string_or_list_and_address_forms() -> None:
    one = parse_email(mail(to="a@example.com"))
    many = parse_email(
        mail(to=["a@example.com", "B <b@example.com>", {"email": "c@example.com", "name": "C"}])
    )
    assert one.to == [Address(email="a@example.com")]
    assert [a.email for a in many.to] == ["a@example.com", "b@example.com", "c@example.com"]
    assert [a.name for a in many.to] == [None, "B", "C"]
    assert parse_email(mail(to={"email": "d@example.com"})).to == [Address(email="d@example.com")]


@pytest.mark.parametrize(
    ("text", "email", "name"),
    [
        ('"Doe, John" <john@example.com>', "john@example.com", "Doe, John"),
        ("<john@example.com>", "john@example.com", None),
        ("  john@example.com  ", "john@example.com", None),
        ("John Doe <John.Doe@Example.COM>", "John.Doe@example.com", "John Doe"),
    ],
)
def test_address_forms(text: str, email: str, name: str | None) -> None:
    assert parse_email(mail(to=text)).to == [Address(email=email, name=name)]


def test_from_and_from_underscore_both_accepted() -> None:
    a = parse_email(mail())
    b = parse_email({**mail(**{"from": ...}), "from_": "Sender <sender@example.com>"})
    assert a == b
    # The model itself, both spellings.
    assert (
        Email(from_="x@example.com", to="y@example.com", subject="s", text="t").from_.email == "x@example.com"
    )
    assert Email.model_validate(
        {"from": "x@example.com", "to": ["y@example.com"], "subject": "s", "html": "h"}
    )


def test_parse_email_accepts_an_email_and_json() -> None:
    e = parse_email(mail(cc=["c@example.com"], tags=["t1"], metadata={"order": 7}))
    assert parse_email(e) == e
    assert parse_email(json.dumps(mail(cc=["c@example.com"], tags=["t1"], metadata={"order": 7}))) == e
    assert parse_email(json.dumps(mail()).encode()) == parse_email(mail())


def test_all_optional_fields() -> None:
    e = parse_email(
        mail(
            cc=["c@example.com"],
            bcc=["d@example.com"],
            reply_to="Support <support@example.com>",
            html="<b>hi</b>",
            headers={"X-Campaign": "spring", "List-Unsubscribe": "<mailto:u@example.com>"},
            tags=["welcome", "a_b-c"],
            metadata={"user_id": 42, "ratio": 0.5, "vip": True, "note": None, "name": "Zoë"},
            priority=10,
            delay=30,
            idempotency_key="order-42",
        )
    )
    assert e.reply_to == [Address(email="support@example.com", name="Support")]
    assert e.headers["X-Campaign"] == "spring"
    assert e.metadata == {"user_id": 42, "ratio": 0.5, "vip": True, "note": None, "name": "Zoë"}
    assert e.priority == 10 and e.delay == 30 and e.idempotency_key == "order-42"
    assert len(e.recipients()) == 3


def test_exactly_max_recipients_is_fine() -> None:
    to = [f"u{i}@example.com" for i in range(MAX_RECIPIENTS - 2)]
    e = parse_email(mail(to=to, cc="c@example.com", bcc="b@example.com"))
    assert len(e.recipients()) == MAX_RECIPIENTS


def test_size_limit_is_inclusive() -> None:
    e = parse_email(mail(text="x" * 100, subject="s"))
    assert parse_email(mail(text="x" * 100, subject="s"), max_bytes=e.size()) == e
    with pytest.raises(EmailValidationError, match=f"limit is {e.size() - 1} bytes"):
        parse_email(mail(text="x" * 100, subject="s"), max_bytes=e.size() - 1)


def test_size_counts_attachments_as_base64_with_line_breaks() -> None:
    """A 7.8 MB file is 10.7 MB on the wire (base64 plus CRLF every 76 characters): more than
    a default postfix takes (10,240,000 bytes), so the default cap refuses it."""
    content = b"\x00" * 7_800_000
    base = parse_email(mail()).size()
    with_file = parse_email(mail(attachments=[{"filename": "f.bin", "content": content}]), max_bytes=1 << 30)
    wire = 10_400_000 + 2 * (10_400_000 // 76 + 1)
    assert with_file.size() - base >= wire > 10_240_000
    with pytest.raises(EmailValidationError, match="attachments: the mail is up to"):
        parse_email(mail(attachments=[{"filename": "f.bin", "content": content}]))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reply_to", [{"email": f"r{i}@example.com", "name": "n" * 200} for i in range(50)]),
        ("to", [{"email": f"r{i}@example.com", "name": "ü" * 200} for i in range(50)]),
        ("headers", {f"X-H{i}": "v" * 998 for i in range(50)}),
        ("subject", "ü" * 998),
    ],
)
def test_size_counts_every_field(field: str, value: Any) -> None:
    """Addresses, names and headers count too (250,000 reply-to addresses once made a 17 MB
    document the cap did not see)."""
    with pytest.raises(EmailValidationError) as info:
        parse_email(mail(**{field: value}), max_bytes=4096)
    assert info.value.errors[0][0] == field and "limit is 4096 bytes" in info.value.errors[0][1]


def test_reply_to_is_bounded_like_the_recipients() -> None:
    with pytest.raises(EmailValidationError, match="reply_to: List should have at most 50 items"):
        parse_email(mail(reply_to=[f"r{i}@example.com" for i in range(51)]))


# --- attachments -----------------------------------------------------------------------


def test_json_attachment_base64_decodes_to_bytes() -> None:
    raw = bytes(range(256)) * 3
    doc = mail(
        attachments=[
            {
                "filename": "räport.pdf",
                "content_type": "application/pdf",
                "content": base64.b64encode(raw).decode(),
            }
        ]
    )
    for source in (json.dumps(doc), json.dumps(doc).encode(), doc):
        e = parse_email(source)
        assert e.attachments[0].content == raw
        assert e.attachments[0].filename == "räport.pdf"
        assert e.attachments[0].content_type == "application/pdf"


def test_python_attachment_bytes_kept_as_is() -> None:
    raw = b"\x00\xff\r\n"
    e = parse_email(mail(attachments=[{"filename": "a.bin", "content": raw}]))
    assert e.attachments[0].content == raw
    assert e.attachments[0].content_type == "application/octet-stream"


def test_model_json_round_trips() -> None:
    # A mail's own JSON (pydantic writes bytes as URL-safe base64) must parse back equal.
    raw = bytes(range(256))
    e = parse_email(
        mail(
            attachments=[{"filename": "a.bin", "content": raw}],
            send_at=dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC),
            metadata={"k": 1},
        )
    )
    again = parse_email(e.model_dump_json())
    assert again == e
    assert again.attachments[0].content == raw
    assert parse_email(e.model_dump_json(by_alias=True)) == e


# --- invalid input, table-driven -------------------------------------------------------

INVALID: list[tuple[str, Any, str, str]] = [
    # (case id, input, field named in errors, text in the message)
    ("bad-address", mail(to="not-an-address"), "to[0]", "not-an-address"),
    # The lenient address parser would join this into a@example.com: another recipient.
    ("split-domain", mail(to="a@exa mple.com"), "to[0]", "not one e-mail address"),
    ("split-domain-named", mail(to="A <a@mail example.com>"), "to[0]", ""),
    ("no-at", mail(to="a.example.com"), "to[0]", ""),
    ("bad-from", mail(**{"from": "nobody"}), "from", ""),
    ("two-in-one", mail(to="a@example.com, b@example.com"), "to[0]", "not one e-mail address"),
    ("two-in-one-list", mail(to=["ok@example.com", "a@example.com; b@example.com"]), "to[1]", ""),
    ("bad-cc", mail(cc=["good@example.com", "bad@"]), "cc[1]", ""),
    ("bad-reply-to", mail(reply_to="x@@example.com"), "reply_to[0]", ""),
    ("no-to", mail(to=...), "to", ""),
    ("empty-to", mail(to=[]), "to", ""),
    ("no-from", mail(**{"from": ...}), "from", ""),
    ("no-body", mail(text=...), "text", "body"),
    ("empty-body", mail(text="", html=""), "text", "body"),
    ("crlf-subject", mail(subject="Hi\r\nBcc: victim@example.com"), "subject", "CR or LF"),
    ("lf-subject", mail(subject="Hi\nthere"), "subject", "CR or LF"),
    ("crlf-header", mail(headers={"X-Note": "a\r\nBcc: victim@example.com"}), "headers", "CR or LF"),
    ("crlf-name", mail(to={"email": "a@example.com", "name": "A\r\nBcc: v@example.com"}), "to[0].name", "CR"),
    ("crlf-name-str", mail(to="A\r\nB <a@example.com>"), "to[0]", "CR or LF"),
    ("crlf-from", mail(**{"from": "a@example.com\r\nBcc: v@example.com"}), "from", "CR or LF"),
    (
        "crlf-filename",
        mail(attachments=[{"filename": "a\r\nb.txt", "content": b"x"}]),
        "attachments[0].filename",
        "CR or LF",
    ),
    (
        "slash-filename",
        mail(attachments=[{"filename": "../etc/passwd", "content": b"x"}]),
        "attachments[0].filename",
        "",
    ),
    ("empty-filename", mail(attachments=[{"filename": "", "content": b"x"}]), "attachments[0].filename", ""),
    ("reserved-bcc", mail(headers={"Bcc": "v@example.com"}), "headers", "set by mailer"),
    ("reserved-case", mail(headers={"REPLY-TO": "v@example.com"}), "headers", "set by mailer"),
    ("header-name", mail(headers={"Bad Name": "v"}), "headers", "not a valid field name"),
    ("header-colon", mail(headers={"X-A:": "v"}), "headers", "not a valid field name"),
    ("oversize", mail(text="x" * 5000), "text", "limit is 1024 bytes"),  # named: the biggest part
    (
        "oversize-attachment",
        mail(attachments=[{"filename": "a", "content": b"x" * 1000}]),
        "attachments",
        "limit",
    ),
    ("51-recipients", mail(to=[f"u{i}@example.com" for i in range(51)]), "to", "51 recipients"),
    (
        "51-over-to-cc-bcc",
        mail(to=[f"u{i}@example.com" for i in range(40)], cc=[f"c{i}@example.com" for i in range(11)]),
        "to",
        "51 recipients",
    ),
    ("subject-int", mail(subject=12), "subject", "valid string"),
    ("subject-empty", mail(subject=""), "subject", ""),
    ("no-subject", mail(subject=...), "subject", ""),
    ("to-int", mail(to=123), "to", "valid list"),
    ("text-list", mail(text=["a"]), "text", "valid string"),
    ("priority-str", mail(priority="high"), "priority", "valid integer"),
    ("priority-neg", mail(priority=-1), "priority", ""),
    ("priority-huge", mail(priority=2**32), "priority", ""),
    ("delay-neg", mail(delay=-5), "delay", ""),
    ("headers-list", mail(headers=["X-A: b"]), "headers", ""),
    ("header-value-int", mail(headers={"X-A": 5}), "headers.X-A", "valid string"),
    ("unknown-field", mail(sender="x@example.com"), "sender", "unknown field"),
    (
        "unknown-address-field",
        mail(to={"email": "a@example.com", "nick": "A"}),
        "to[0].nick",
        "unknown field",
    ),
    (
        "unknown-attachment-field",
        mail(attachments=[{"filename": "a", "content": b"", "x": 1}]),
        "attachments[0].x",
        "",
    ),
    ("metadata-nested", mail(metadata={"a": {"b": 1}}), "metadata", "must be a string"),
    ("metadata-list", mail(metadata={"a": [1, 2]}), "metadata", "must be a string"),
    ("metadata-key", mail(metadata={"$where": "x"}), "metadata", "metadata key"),
    ("metadata-dotted-key", mail(metadata={"a.b": "x"}), "metadata", "metadata key"),
    ("metadata-not-dict", mail(metadata="x"), "metadata", ""),
    ("bad-tag", mail(tags=["ok", "not ok!"]), "tags", "tag"),
    ("too-many-tags", mail(tags=[f"t{i}" for i in range(11)]), "tags", ""),
    ("naive-send-at", mail(send_at=dt.datetime(2031, 1, 1, 9, 0)), "send_at", "timezone"),
    ("naive-send-at-str", mail(send_at="2031-01-01T09:00:00"), "send_at", "timezone"),
    ("bad-send-at", mail(send_at="next tuesday"), "send_at", ""),
    ("send-at-and-delay", mail(send_at="2031-01-01T09:00:00Z", delay=5), "delay", "not both"),
    (
        "bad-base64",
        mail(attachments=[{"filename": "a", "content": "not base64!"}]),
        "attachments[0].content",
        "base64",
    ),
    (
        "bad-content-type",
        mail(attachments=[{"filename": "a", "content": b"", "content_type": "pdf"}]),
        "",
        "",
    ),
    ("empty-idempotency-key", mail(idempotency_key=""), "idempotency_key", ""),
    ("control-idempotency-key", mail(idempotency_key="a\nb"), "idempotency_key", "printable"),
    ("not-a-mapping", [mail()], "(mail)", "mapping"),
    ("bad-json", '{"from": ', "(mail)", "JSON"),
    # line breaks other than CR/LF, NUL and controls, in every header-bound field
    *[
        (f"subject-{ord(c):x}", mail(subject=f"a{c}b"), "subject", "CR or LF")
        for c in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00\x7f"
    ],
    ("header-nul", mail(headers={"X-A": "a\x00b"}), "headers", "NUL"),
    ("header-u2028", mail(headers={"X-A": "a\u2028b"}), "headers", "CR or LF"),
    ("name-x85", mail(to={"email": "a@example.com", "name": "A\x85B"}), "to[0].name", "CR or LF"),
    ("name-str-x0b", mail(to="A\x0bB <a@example.com>"), "to[0]", "CR or LF"),
    (
        "filename-x1e",
        mail(attachments=[{"filename": "a\x1eb.txt", "content": b"x"}]),
        "attachments[0].filename",
        "CR or LF",
    ),
    ("metadata-value-nul", mail(metadata={"k": "a\x00b"}), "metadata.k", "NUL"),
    # a pattern's "$" also matches before a final newline: every name check matches whole
    ("header-name-newline", mail(headers={"X-A\n": "v"}), "headers", "valid field name"),
    ("header-name-newline-bcc", mail(headers={"X-A\nBcc": "v"}), "headers", "valid field name"),
    ("tag-newline", mail(tags=["vip\n"]), "tags", "letters"),
    ("metadata-key-newline", mail(metadata={"k\n": 1}), "metadata", "letters"),
    ("metadata-value-list", mail(metadata={"k": [1]}), "metadata.k", "string, number"),
    ("metadata-value-big-int", mail(metadata={"k": 2**63}), "metadata.k", "64 bits"),
    ("metadata-value-long", mail(metadata={"k": "x" * 1001}), "metadata.k", "1000"),
    ("metadata-51-keys", mail(metadata={f"k{i}": i for i in range(51)}), "metadata", "50"),
    (
        "content-type-100k",
        mail(attachments=[{"filename": "a", "content": b"", "content_type": "a/" + "b" * 100_000}]),
        "attachments[0].content_type",
        "",
    ),
    (
        "content-type-non-ascii",
        mail(attachments=[{"filename": "a", "content": b"", "content_type": "text/plaïn"}]),
        "attachments[0].content_type",
        "",
    ),
    ("reserved-content-disposition", mail(headers={"Content-Disposition": "inline"}), "headers", "MIME"),
    ("reserved-content-id", mail(headers={"content-id": "<x@y>"}), "headers", "MIME"),
    ("metadata-nan", mail(metadata={"r": float("nan")}), "metadata.r", "finite"),
    ("metadata-too-long", mail(metadata={f"k{i}": "x" * 100 for i in range(10)}), "metadata", "one"),
    ("reply-to-51", mail(reply_to=[f"r{i}@example.com" for i in range(51)]), "reply_to", "at most 50"),
]


def under(name: str, field: str) -> bool:
    """``name`` is ``field`` or one of its parts (``to[0].email`` is under ``to[0]``)."""
    return name == field or name.startswith((field + ".", field + "["))


@pytest.mark.parametrize(("data", "field", "text"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_input_names_the_field(data: Any, field: str, text: str) -> None:
    with pytest.raises(EmailValidationError) as info:
        parse_email(data, max_bytes=1024)
    err = info.value
    assert err.errors, "errors must not be empty"
    named = [(f, msg) for f, msg in err.errors if under(f, field or "attachments[0]")]
    assert named, f"{field!r} not named in {err.errors}"
    if text:
        assert any(text in msg for _, msg in named), err.errors
    assert "nothing was stored or queued" in str(err)
    assert isinstance(err, ValueError)


def test_invalid_cases_are_many_and_distinct() -> None:
    ids = [c[0] for c in INVALID]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(EmailValidationError) as info:
        parse_email(mail(to="bad", subject="a\nb", priority="x"))
    for field in ("to[0]", "subject", "priority"):
        assert any(under(f, field) for f, _ in info.value.errors), info.value.errors


def test_no_pydantic_error_escapes() -> None:
    for data in (None, 42, b"\xff\xfe", "[]"):
        with pytest.raises(EmailValidationError):
            parse_email(data)  # type: ignore[arg-type]


def test_default_size_limit_is_what_a_default_postfix_accepts() -> None:
    assert MAX_EMAIL_BYTES <= 10_240_000  # postfix's default message_size_limit
    with pytest.raises(EmailValidationError, match="limit is 10000000 bytes"):
        parse_email(mail(text="x" * 10_000_000))


def nested(depth: int, leaf: Any = "a@example.com") -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"to": nested(5000)}, "to"),
        ({"metadata": {"a": nested(5000)}}, "metadata.a"),
        ({"cc": [{"email": nested(5000)}]}, "cc"),
        ({"headers": {"X-A": nested(5000)}}, "headers"),
    ],
)
def test_deep_nesting_is_a_field_error_not_a_recursion_error(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(EmailValidationError) as info:
        parse_email(mail(**changes))
    assert any(under(f, field) for f, _ in info.value.errors), info.value.errors
    assert len(str(info.value)) < 2000


def test_deep_json_is_a_field_error() -> None:
    """Deeper than the JSON parser's own limit: the field is found without recursion."""
    doc = json.dumps(mail(text="@@")).replace('"@@"', "[" * 300 + '"x"' + "]" * 300)
    with pytest.raises(EmailValidationError, match=r"text\[0\]: nested more than"):
        parse_email(doc)
    with pytest.raises(EmailValidationError, match=r"\(mail\): Invalid JSON"):
        parse_email(json.dumps(mail(text="@@")).replace('"@@"', "[" * 5000 + "]" * 5000))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_metadata_is_a_field_error(value: float) -> None:
    for data in (mail(metadata={"ratio": value}), json.dumps(mail(metadata={"ratio": value}))):
        with pytest.raises(EmailValidationError, match=r"metadata\.ratio: a metadata value must be a finite"):
            parse_email(data)


def test_an_empty_key_is_named() -> None:
    for changes, field in (({"": 1}, '""'), ({"metadata": {"": 1}}, 'metadata.""')):
        with pytest.raises(EmailValidationError) as info:
            parse_email(mail(**changes))
        assert info.value.errors[0][0] == field, info.value.errors


def test_plain_metadata_is_kept_exactly_and_copied() -> None:
    """The one-loop check of plain metadata keeps every value and its type (True is not 1,
    1.0 is not 1) and stores a copy, so a caller's later change does not reach the mail."""
    given: dict[str, Any] = {
        "s": "x",
        "t": True,
        "f": False,
        "n": None,
        "i": -(2**63),
        "j": 2**63 - 1,
        "r": 1.0,
        "k_-9": "",
    }
    for data in (mail(metadata=given), json.dumps(mail(metadata=given))):
        got = parse_email(data).metadata
        assert got == given
        assert [type(v) for v in got.values()] == [type(v) for v in given.values()]
    email = parse_email(mail(metadata=given))
    given["s"] = "changed"
    assert email.metadata["s"] == "x"


class _Key(str):
    pass


def test_metadata_of_unusual_types_gets_the_full_check() -> None:
    """A str subclass as key, or a value metadata cannot hold, goes through pydantic's pass:
    the key is accepted as plain text, the value's entry is named."""
    assert parse_email(mail(metadata={_Key("k"): "v"})).metadata == {"k": "v"}
    with pytest.raises(EmailValidationError, match=r"metadata\.k: a metadata value must be a string"):
        parse_email(mail(metadata={"k": {"nested": 1}}))


def test_metadata_must_fit_one_header_line() -> None:
    fits = {f"k{i}": "x" * (MAX_METADATA_JSON // 10 - 8) for i in range(10)}
    assert len(metadata_json(fits)) <= MAX_METADATA_JSON
    assert parse_email(mail(metadata=fits)).metadata == fits
    with pytest.raises(EmailValidationError, match="metadata: metadata is 1031 characters as JSON"):
        parse_email(mail(metadata={f"k{i}": "x" * 95 for i in range(10)}))


@pytest.mark.parametrize(
    "name",
    ["Ñandú, Sr.", 'Jo "J" <x>', "a\\b", "plain name", "Zoë", "(c) 2026; o'k"],
)
@pytest.mark.parametrize("addr", ["ñandú@example.com", "ann@bücher.example", "a.b+c@example.com"])
def test_address_str_formats_every_accepted_address(name: str, addr: str) -> None:
    """str() of an address once raised NonASCIILocalPartDefect for SMTPUTF8 local parts."""
    from email.utils import getaddresses

    text = str(parse_email(mail(to={"email": addr, "name": name})).to[0])
    assert getaddresses([text]) == [(name, addr)]
    assert parse_email(mail(to=text)).to[0] == Address(email=addr, name=name)


def test_from_stored_skips_the_limits() -> None:
    data = parse_email(mail(to=[f"u{i}@example.com" for i in range(60)]), max_recipients=100).model_dump()
    assert len(Email.from_stored(data).to) == 60


# --- delays ----------------------------------------------------------------------------


def test_delay_seconds() -> None:
    now = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_email(mail()).delay_seconds(now) == 0
    assert parse_email(mail(delay=30)).delay_seconds(now) == 30
    assert parse_email(mail(delay=0)).delay_seconds(now) == 0
    assert parse_email(mail(delay=7.4)).delay_seconds(now) == 8  # rounds up, like send_at: never early
    at = parse_email(mail(send_at="2030-01-01T12:01:00Z"))
    assert at.delay_seconds(now) == 60
    # A partial second rounds up: never send early.
    assert parse_email(mail(send_at="2030-01-01T12:00:10.200Z")).delay_seconds(now) == 11
    # Another zone: the same instant.
    assert parse_email(mail(send_at="2030-01-01T14:00:30+02:00")).delay_seconds(now) == 30
    # In the past: now.
    assert parse_email(mail(send_at="2029-12-31T00:00:00Z")).delay_seconds(now) == 0


def test_delay_seconds_defaults_to_the_clock() -> None:
    soon = dt.datetime.now(UTC) + dt.timedelta(seconds=100)
    d = parse_email(mail(send_at=soon)).delay_seconds()
    assert 98 <= d <= 101


def test_send_at_is_kept_to_the_millisecond() -> None:
    # Stored as a BSON datetime (milliseconds): the model keeps exactly what reads back.
    e = parse_email(mail(send_at=dt.datetime(2031, 1, 1, 9, 0, 0, 123456, tzinfo=UTC)))
    assert e.send_at == dt.datetime(2031, 1, 1, 9, 0, 0, 123000, tzinfo=UTC)


def test_address_fast_path_agrees_with_email_validator_and_the_stdlib_parser() -> None:
    """The regex fast paths must accept, refuse and normalize exactly as the slow paths."""
    import random
    import string
    from email.utils import getaddresses

    from email_validator import EmailNotValidError, validate_email

    from mailer.models import _split_address, normalize_email

    rng = random.Random(7)
    local_chars = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-."
    domain_chars = string.ascii_letters + string.digits + "-."
    tlds = [".com", ".c", ".co1", ".test", ".de", "", ".xn--p1ai", ".COM", ".localhost"]
    for _ in range(5000):
        local = "".join(rng.choice(local_chars) for _ in range(rng.randint(1, 12)))
        domain = "".join(rng.choice(domain_chars) for _ in range(rng.randint(1, 12))) + rng.choice(tlds)
        address = f"{local}@{domain}"
        normalize_email.cache_clear()
        try:
            fast: str | None = normalize_email(address)
        except ValueError:
            fast = None
        try:
            slow: str | None = validate_email(address, check_deliverability=False).normalized
        except EmailNotValidError:
            slow = None
        assert fast == slow, address

    def outcome(pair: tuple[str, str] | None) -> tuple[str | None, str] | None:
        if pair is None:
            return None
        try:
            return (" ".join(pair[0].split()) or None, normalize_email(pair[1]))
        except ValueError:
            return None

    name_chars = "abcAB -_'éöœ☃0.,;:<>\"()@[]\\"
    for _ in range(5000):
        name = "".join(rng.choice(name_chars) for _ in range(rng.randint(0, 8)))
        addr = rng.choice(["a@b.co", "x.y@ex-ample.com", "q@q"])
        for text in (f"{name} <{addr}>", f"{name}{addr}", addr, f" {addr} "):
            try:
                got: tuple[str, str] | None = _split_address(text)
            except ValueError:
                got = None
            pairs = getaddresses([text])
            ok = len(pairs) == 1 and pairs[0][1] and pairs[0][1] in text
            assert outcome(got) == outcome(pairs[0] if ok else None), text


def test_the_rough_size_bound_is_never_below_the_exact_one() -> None:
    """The cap skips the exact sum when the cheap bound is under it; a bound below ``size()``
    would let an oversized mail through. Checked on the builders' varied random mails, and on
    bodies that grow the most when encoded."""
    from tests.vendors.test_builders import accepted_mails

    worst = [
        mail(text="=" * 5000, html="\u00e9\U0001f600" * 3000, subject="\u00e9" * 900),
        mail(text="\n" * 4000, to=[f"\u00c5sa {i} <a{i}@b\u00fccher.example>" for i in range(40)]),
    ]
    for email in [*accepted_mails(), *(parse_email(m) for m in worst)]:
        assert email._rough_bound() >= email.size(), email


def test_a_mail_just_over_the_cap_is_refused_even_when_the_rough_bound_is_skipped() -> None:
    e = parse_email(mail(text="\u00e9" * 3000))
    with pytest.raises(EmailValidationError, match="limit is"):
        parse_email(mail(text="\u00e9" * 3000), max_bytes=e.size() - 1)
    assert parse_email(mail(text="\u00e9" * 3000), max_bytes=e.size()) == e


@pytest.mark.parametrize(
    "changes",
    [
        {"subject": "a\ud800b"},
        {"metadata": {"k\udcff": 1}},
        {"headers": {"X-A": "\udc80"}},
        {"to": [{"email": "a@example.com", "name": "\ud83d"}]},
    ],
)
def test_lone_surrogates_anywhere_are_named(changes: dict[str, Any]) -> None:
    """The clean-input fast path must send every lone surrogate to the walk that names it."""
    with pytest.raises(EmailValidationError) as info:
        parse_email(mail(**changes))
    assert any("UTF-8" in msg for _, msg in info.value.errors), info.value.errors


# --- the shared Address of a text address, and the metadata bound --------------------------


def test_an_address_given_as_text_is_validated_once_and_shared() -> None:
    first = parse_email(mail(to="Ann <Ann@EXAMPLE.com>"))
    second = parse_email(mail(to="Ann <Ann@EXAMPLE.com>"))
    assert first.to[0] is second.to[0]  # frozen, so sharing it is safe
    assert first.to[0] == Address(email="Ann@example.com", name="Ann")
    assert parse_email(mail(to={"email": "Ann@EXAMPLE.com"})).to[0].email == "Ann@example.com"


def test_a_bad_text_address_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(EmailValidationError) as caught:
            parse_email(mail(to="Ann <not an address>"))
        assert [field for field, _ in caught.value.errors] == ["to[0].email"]


def test_a_trusted_text_address_is_never_shared_with_untrusted_input() -> None:
    """Trusted input skips normalisation; its Address must not answer later, checked input."""
    text = "Bob <Bob@MIXED-case.example>"
    trusted = Address.model_validate(text, context={"trusted": True})
    assert trusted.email == "Bob@MIXED-case.example"
    checked = Address.model_validate(text)
    assert checked.email == "Bob@mixed-case.example"


def test_the_address_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from mailer import models

    monkeypatch.setattr(models, "_ADDRESS_CACHE", {})
    monkeypatch.setattr(models, "_ADDRESS_CACHE_MAX", 3)
    for i in range(10):
        Address.model_validate(f"user{i}@example.com")
        assert len(models._ADDRESS_CACHE) <= 3


@pytest.mark.parametrize(
    "value",
    [
        "\U0001f600" * 10,  # non-BMP: a surrogate pair of \uXXXX each, 12 characters
        "\x01\x02\x1f" * 7,
        '"\\' * 9,
        "plain ascii",
        "",
        -(2**63),
        2**63 - 1,
        -1.7976931348623157e308,
        5e-324,
        True,
        False,
        None,
    ],
)
def test_the_metadata_bound_is_never_below_the_json(value: Any) -> None:
    from mailer.models import _metadata_json_bound

    metadata = {"k": value, "a-much-longer_key": value}
    assert _metadata_json_bound(metadata) >= len(metadata_json(metadata))


def test_metadata_just_over_the_limit_is_still_refused() -> None:
    fits = MAX_METADATA_JSON - len(metadata_json({"k": ""}))
    with pytest.raises(EmailValidationError) as caught:
        parse_email(mail(metadata={"k": "x" * (fits + 1)}))
    assert [field for field, _ in caught.value.errors] == ["metadata"]
    at_limit = {"k": "x" * fits}
    assert len(metadata_json(at_limit)) == MAX_METADATA_JSON
    assert parse_email(mail(metadata=at_limit)).metadata == at_limit
