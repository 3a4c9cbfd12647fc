"""Malformed mails, table-driven, through both front doors: ``Producer.send`` and
``mailer send --file -``. Each one must get a clear error that names the field, ``mailer send``
must exit 1 with one line on stderr, and nothing may be stored or queued."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailer import cli
from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.errors import EmailValidationError, NotFound
from mailer.producer import Producer
from mailer.store import MailStore

GOOD: dict[str, Any] = {
    "from": "Sender <sender@example.com>",
    "to": "rcpt@example.com",
    "subject": "Hello",
    "text": "Hello there",
}
MAILER = Path(sys.executable).parent / "mailer"


def mail(**changes: Any) -> dict[str, Any]:
    """GOOD with fields changed; ``...`` removes one. ``from`` is spelled ``from_`` here."""
    out = dict(GOOD)
    for key, value in changes.items():
        key = "from" if key == "from_" else key
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def raw(text: str) -> bytes:
    return text.encode()


def with_bytes(field: str, value: bytes) -> bytes:
    """GOOD as JSON bytes with ``field``'s string replaced by raw (maybe non-UTF-8) bytes."""
    doc = json.dumps(mail(**{field: "@@PLACEHOLDER@@"})).encode()
    return doc.replace(b"@@PLACEHOLDER@@", value)


@dataclass(frozen=True)
class Case:
    id: str
    data: Any  # a dict (JSON-encoded for the CLI) or the raw bytes both doors get
    field: str  # the field the error must name ("(mail)": the document as a whole)

    def json_bytes(self) -> bytes:
        return self.data if isinstance(self.data, bytes) else json.dumps(self.data).encode()


CASES = [
    # addresses
    Case("from-missing", mail(from_=...), "from"),
    Case("from-not-an-address", mail(from_="not-an-address"), "from"),
    Case("from-two-addresses", mail(from_="a@example.com, b@example.com"), "from"),
    Case("from-crlf-injection", mail(from_="a@example.com\r\nBcc: victim@example.com"), "from"),
    Case("from-number", mail(from_=42), "from"),
    Case("from-nul", mail(from_="a\x00b@example.com"), "from"),
    Case("to-missing", mail(to=...), "to"),
    Case("to-empty-list", mail(to=[]), "to"),
    Case("to-empty-string", mail(to=""), "to"),
    Case("to-no-domain", mail(to="bob@"), "to"),
    Case("to-no-dot-domain", mail(to="bob@localhost"), "to"),
    Case("to-second-bad", mail(to=["ok@example.com", "not valid"]), "to[1]"),
    Case("to-object-unknown-key", mail(to={"email": "a@example.com", "nick": "A"}), "to[0].nick"),
    Case("to-display-name-lf", mail(to="Ann\n <a@example.com>"), "to"),
    Case("to-number", mail(to=123), "to"),
    Case("cc-invalid", mail(cc="cc@@example.com"), "cc"),
    Case("bcc-invalid", mail(bcc=["fine@example.com", "nope"]), "bcc"),
    Case("reply-to-invalid", mail(reply_to="reply@"), "reply_to"),
    Case(
        "51-recipients",
        mail(to=[f"r{i}@example.com" for i in range(40)], cc=[f"c{i}@example.com" for i in range(11)]),
        "to",
    ),
    Case("10000-recipients", mail(to=[f"r{i}@example.com" for i in range(10_000)]), "to"),
    Case("10000-bad-recipients", mail(to=[f"bad{i}" for i in range(10_000)]), "to"),
    # subject and bodies
    Case("subject-missing", mail(subject=...), "subject"),
    Case("subject-empty", mail(subject=""), "subject"),
    Case("subject-999-chars", mail(subject="s" * 999), "subject"),
    Case("subject-crlf", mail(subject="Hi\r\nBcc: victim@example.com"), "subject"),
    Case("subject-number", mail(subject=5), "subject"),
    Case("subject-list", mail(subject=["a", "b"]), "subject"),
    Case("no-body", mail(text=...), "text"),
    Case("text-object", mail(text={"a": 1}), "text"),
    Case("html-number", mail(html=12), "html"),
    Case("text-11-mb", mail(text="x" * (11 * 1024 * 1024)), "text"),
    Case("html-11-mb", mail(html="<p>" + "x" * (11 * 1024 * 1024)), "html"),
    # headers
    Case("headers-list", mail(headers=["X-A: b"]), "headers"),
    Case("header-value-crlf", mail(headers={"X-Campaign": "a\r\nBcc: victim@example.com"}), "headers"),
    Case("header-value-lf", mail(headers={"X-Campaign": "a\nb"}), "headers"),
    Case("header-name-space", mail(headers={"X Campaign": "a"}), "headers"),
    Case("header-name-crlf", mail(headers={"X-A\r\nBcc": "v@example.com"}), "headers"),
    Case("header-reserved-bcc", mail(headers={"Bcc": "victim@example.com"}), "headers"),
    Case("header-value-999-chars", mail(headers={"X-Long": "v" * 999}), "headers"),
    Case("header-value-number", mail(headers={"X-Num": 5}), "headers.X-Num"),
    Case("51-headers", mail(headers={f"X-H{i}": "v" for i in range(51)}), "headers"),
    # unknown keys
    Case("unknown-key", mail(sender="x@example.com"), "sender"),
    Case("unknown-key-case", mail(From="a@example.com"), "From"),
    Case("unknown-nested-junk", mail(extra={"deep": [{"junk": True}]}), "extra"),
    # tags and metadata
    Case("tags-string", mail(tags="welcome"), "tags"),
    Case("tags-bad-chars", mail(tags=["hello world"]), "tags"),
    Case("tags-11", mail(tags=[f"t{i}" for i in range(11)]), "tags"),
    Case("metadata-nested-object", mail(metadata={"user": {"id": 1}}), "metadata"),
    Case("metadata-nested-list", mail(metadata={"ids": [1, 2, [3]]}), "metadata"),
    Case("metadata-deep-junk", mail(metadata={"a": {"b": {"c": {"d": [None, {"e": "f"}]}}}}), "metadata"),
    Case("metadata-bad-key", mail(metadata={"bad key!": 1}), "metadata"),
    Case("metadata-51-keys", mail(metadata={f"k{i}": i for i in range(51)}), "metadata"),
    Case("metadata-1001-chars", mail(metadata={"note": "n" * 1001}), "metadata"),
    Case("metadata-list", mail(metadata=["a", "b"]), "metadata"),
    Case("metadata-int-over-64-bits", mail(metadata={"big": 2**70}), "metadata"),
    # attachments
    Case(
        "attachment-not-base64",
        mail(attachments=[{"filename": "a.txt", "content": "!!!"}]),
        "attachments[0].content",
    ),
    Case("attachment-no-filename", mail(attachments=[{"content": "aGk="}]), "attachments[0].filename"),
    Case(
        "attachment-path-filename",
        mail(attachments=[{"filename": "../etc/passwd", "content": "aGk="}]),
        "attachments[0].filename",
    ),
    Case(
        "attachment-bad-type",
        mail(attachments=[{"filename": "a", "content_type": "pdf", "content": "aGk="}]),
        "attachments[0].content_type",
    ),
    Case("attachments-object", mail(attachments={"filename": "a"}), "attachments"),
    # scheduling and keys
    Case("priority-string", mail(priority="high"), "priority"),
    Case("priority-negative", mail(priority=-1), "priority"),
    Case("priority-too-big", mail(priority=2**32), "priority"),
    Case("priority-float", mail(priority=1.5), "priority"),
    Case("delay-negative", mail(delay=-5), "delay"),
    Case("delay-string", mail(delay="soon"), "delay"),
    Case("send-at-not-a-date", mail(send_at="tomorrow"), "send_at"),
    Case("send-at-naive", mail(send_at="2030-01-01T09:00:00"), "send_at"),
    Case("send-at-and-delay", mail(send_at="2030-01-01T09:00:00Z", delay=5), "delay"),
    Case("idempotency-key-empty", mail(idempotency_key=""), "idempotency_key"),
    Case("idempotency-key-newline", mail(idempotency_key="a\nb"), "idempotency_key"),
    Case("idempotency-key-257", mail(idempotency_key="k" * 257), "idempotency_key"),
    Case("idempotency-key-number", mail(idempotency_key=5), "idempotency_key"),
    # bytes that are not UTF-8, and documents that are not mails
    Case("non-utf8-subject", with_bytes("subject", b"caf\xe9 \xff\xfe"), "subject"),
    Case("non-utf8-to", with_bytes("to", b"b\xc3@example.com"), "to"),
    Case("non-utf8-text", with_bytes("text", b"\x80\x81\x82"), "text"),
    Case("lone-surrogate-escape", mail(subject="\ud800 broken"), "subject"),
    Case("not-json", raw("hello"), "(mail)"),
    Case("truncated-json", raw('{"from": "a@example.com", "to": '), "(mail)"),
    Case("json-array", raw("[]"), "(mail)"),
    Case("json-null", raw("null"), "(mail)"),
    Case("json-string", raw('"a@example.com"'), "(mail)"),
    Case("empty-input", b"", "(mail)"),
    # accepted once, then undeliverable (the MIME builder raised, or a relay cut or refused it)
    Case("subject-vertical-tab", mail(subject="a\x0bb"), "subject"),
    Case("subject-form-feed", mail(subject="a\x0cb"), "subject"),
    Case("subject-file-separator", mail(subject="a\x1cb"), "subject"),
    Case("subject-next-line", mail(subject="a\x85b"), "subject"),
    Case("subject-line-separator", mail(subject="a\u2028b"), "subject"),
    Case("subject-paragraph-separator", mail(subject="a\u2029b"), "subject"),
    Case("subject-nul", mail(subject="a\x00b"), "subject"),
    Case("header-value-nul", mail(headers={"X-Campaign": "a\x00b"}), "headers"),
    Case("header-value-record-separator", mail(headers={"X-Campaign": "a\x1eb"}), "headers"),
    Case(
        "display-name-line-separator", mail(to={"email": "a@example.com", "name": "A\u2028B"}), "to[0].name"
    ),
    Case(
        "filename-vertical-tab",
        mail(attachments=[{"filename": "a\x0bb.txt", "content": "aGk="}]),
        "attachments[0].filename",
    ),
    Case("metadata-value-nul", mail(metadata={"note": "a\x00b"}), "metadata.note"),
    Case(
        "content-type-100000-chars",
        mail(attachments=[{"filename": "a", "content_type": "a/" + "b" * 100_000, "content": "aGk="}]),
        "attachments[0].content_type",
    ),
    Case("header-content-disposition", mail(headers={"Content-Disposition": "attachment"}), "headers"),
    Case("header-content-id", mail(headers={"Content-ID": "<x@example.com>"}), "headers"),
    Case("metadata-nan", mail(metadata={"ratio": float("nan")}), "metadata.ratio"),
    Case("metadata-infinity", mail(metadata={"ratio": float("inf")}), "metadata.ratio"),
    Case("metadata-over-one-header-line", mail(metadata={f"k{i}": "x" * 100 for i in range(10)}), "metadata"),
    Case("metadata-empty-key", mail(metadata={"": 1}), "metadata"),
    Case("empty-key", mail(**{"": 1}), '""'),
    Case("reply-to-51", mail(reply_to=[f"r{i}@example.com" for i in range(51)]), "reply_to"),
    Case(
        "attachment-7.8-mb-is-10.7-mb-on-the-wire",
        mail(attachments=[{"filename": "a.bin", "content": base64.b64encode(b"\x00" * 7_800_000).decode()}]),
        "attachments",
    ),
]


def named(errors: list[tuple[str, str]], field: str) -> bool:
    return any(f == field or f.startswith((f"{field}.", f"{field}[")) for f, _ in errors)


async def stored_and_queued(settings: Settings) -> tuple[int, int]:
    """(documents in the collection, jobs in the tube in any state)."""
    async with MailStore(settings) as store:
        docs = await store.mails.count_documents({})
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as bs:
        try:
            stats = await bs.stats_tube(b.tube)
        except NotFound:
            return docs, 0
    jobs = sum(int(stats[f"current-jobs-{s}"]) for s in ("ready", "reserved", "delayed", "buried"))
    return docs, jobs


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_producer_send_rejects(settings: Settings, case: Case) -> None:
    async with Producer(settings) as producer:
        assert await stored_and_queued(settings) == (0, 0)
        with pytest.raises(EmailValidationError) as info:
            await producer.send(case.data)
        assert await stored_and_queued(settings) == (0, 0)
    assert named(info.value.errors, case.field), (case.field, info.value.errors)
    message = str(info.value)
    assert case.field in message and "nothing was stored or queued" in message
    assert "\n" not in message and len(message) < 2000, message[:300]


def cli_env(settings: Settings) -> dict[str, str]:
    b, m = settings.beanstalkd, settings.mongodb
    return {
        "MAILER_BEANSTALKD__HOST": b.host,
        "MAILER_BEANSTALKD__PORT": str(b.port),
        "MAILER_BEANSTALKD__TUBE": b.tube,
        "MAILER_MONGODB__URI": m.uri.get_secret_value(),
        "MAILER_MONGODB__COLLECTION": m.collection,
        "MAILER_MONGODB__VENDOR_STATUS_COLLECTION": m.vendor_status_collection,
    }


@pytest.fixture
def cli_settings(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[Settings, Path]:
    """The environment points `mailer` at this test's tube and collections; an empty config
    file keeps a developer's ./config.toml out of it."""
    for key in list(os.environ):
        if key.startswith("MAILER_"):
            monkeypatch.delenv(key)
    for key, value in cli_env(settings).items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "empty.toml"
    config.write_text("")
    return settings, config


async def run_cli_send(monkeypatch: pytest.MonkeyPatch, config: Path, data: bytes) -> int:
    """``mailer send --file -`` in this process (in a thread: it runs its own event loop)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    return await asyncio.to_thread(cli.main, ["send", "--config", str(config), "--file", "-"])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_cli_send_rejects(
    cli_settings: tuple[Settings, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: Case,
) -> None:
    settings, config = cli_settings
    rc = await run_cli_send(monkeypatch, config, case.json_bytes())
    out, err = capsys.readouterr()
    assert rc == 1, (rc, out, err[:500])
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err[:500]
    assert err.startswith("mailer send: invalid e-mail, nothing was stored or queued: "), err[:300]
    assert case.field in err, (case.field, err[:300])
    assert await stored_and_queued(settings) == (0, 0)


async def test_cli_send_accepts_the_good_mail(
    cli_settings: tuple[Settings, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control: the same door and the same counting see a valid mail stored and queued."""
    settings, config = cli_settings
    rc = await run_cli_send(monkeypatch, config, json.dumps(GOOD).encode())
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(out.strip()) == 24 and err == ""
    assert await stored_and_queued(settings) == (1, 1)


# A few through the real console script and a real stdin, so the process's own stdin
# decoding (locale) and exit path are covered too.
SUBPROCESS_CASES = ["non-utf8-subject", "unknown-key", "10000-recipients", "not-json"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
async def test_console_script_send_rejects(settings: Settings, tmp_path: Path, case_id: str) -> None:
    case = next(c for c in CASES if c.id == case_id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(cli_env(settings))
    env["LC_ALL"] = env["LANG"] = "C"  # the locale must not matter
    proc = await asyncio.to_thread(
        subprocess.run,
        [str(MAILER), "send", "--file", "-"],
        input=case.json_bytes(),
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, (proc.returncode, err[:500])
    assert proc.stdout == b""
    assert err.count("\n") == 1 and case.field in err, err[:500]
    assert await stored_and_queued(settings) == (0, 0)
