"""End to end with the real adapters: producer -> beanstalkd -> consumer -> the local vendor doubles.

All five adapters are built by ``build_vendors`` from production settings that point them at
the doubles (moto for SES, the HTTP doubles for Mailgun, Brevo and SparkPost, aiosmtpd for
SMTP), so the configuration wiring is exercised too. One vendor fails for every request; the
test then checks, from what each double recorded, that every mail went out exactly once
through a healthy vendor, that the stored message id is the one that vendor answered, and
that the failing vendor was taken out of rotation after its first failure.
"""

from __future__ import annotations

import asyncio
import email
import json
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email import policy
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from pydantic import SecretStr
from vendors.http_doubles import (
    BREVO_KEY,
    MAILGUN_DOMAIN,
    MAILGUN_KEY,
    SPARKPOST_KEY,
    BrevoDouble,
    MailgunDouble,
    RecordedRequest,
    Reply,
    SparkpostDouble,
)
from vendors.ses_doubles import MotoSes, free_port, ses_settings

from mailer.config import (
    MailgunSettings,
    SendinblueSettings,
    Settings,
    SmtpSettings,
    SparkpostSettings,
    VendorsSettings,
)
from mailer.consumer import Consumer
from mailer.models import MAIL_ID_HEADER, Attempt, MailRecord, Outcome, Status
from mailer.producer import Producer
from mailer.store import MailStore
from mailer.vendors import build_vendors
from mailer.vendors.amazon import AmazonVendor
from mailer.vendors.mailgun import MailgunVendor
from mailer.vendors.sendinblue import SendinblueVendor
from mailer.vendors.smtp import SmtpVendor
from mailer.vendors.sparkpost import SparkpostVendor

pytestmark = pytest.mark.timeout(60)

SENDER = "sender@example.com"
ORDER = ["amazon", "mailgun", "sendinblue", "sparkpost", "smtp"]
ADAPTERS = {
    "amazon": AmazonVendor,
    "mailgun": MailgunVendor,
    "sendinblue": SendinblueVendor,
    "sparkpost": SparkpostVendor,
    "smtp": SmtpVendor,
}
COOLDOWN_S = 600.0
MakeSettings = Callable[..., Awaitable[Settings]]
DEADLINE_S = 30.0


# --- the doubles ----------------------------------------------------------------------


class AlwaysFailing(SparkpostDouble):
    """SparkPost that checks each request as usual, then answers 500 to all of them."""

    def check(self, request: RecordedRequest) -> Reply | None:
        super().check(request)
        return Reply(500, {"errors": [{"message": "Internal server error", "code": "1901"}]})


@dataclass
class QueueingRelay:
    """aiosmtpd handler that accepts everything and names a fresh queue id for each message."""

    delivered: list[tuple[str, str]] = field(default_factory=list)  # (X-Mailer-Id, queue id)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        msg = email.message_from_bytes(content, policy=policy.default)
        queue_id = f"E2E{len(self.delivered) + 1:05d}"
        self.delivered.append((str(msg[MAIL_ID_HEADER]), queue_id))
        return f"250 2.0.0 Ok: queued as {queue_id}"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoSes]:
    server = MotoSes()
    server.start()
    yield server
    server.stop()


@dataclass
class Doubles:
    moto: MotoSes
    mailgun: MailgunDouble
    brevo: BrevoDouble
    sparkpost: SparkpostDouble
    relay: QueueingRelay
    smtp: Controller

    async def sent(self) -> dict[str, list[tuple[str, str | None]]]:
        """``{vendor: [(X-Mailer-Id, message id answered or None), ...]}`` per request received."""
        out: dict[str, list[tuple[str, str | None]]] = {}
        out["amazon"] = await self._ses_sent()
        out["mailgun"] = [
            (r.fields(f"h:{MAIL_ID_HEADER}")[0], _answered(r, "id")) for r in self.mailgun.requests
        ]
        out["sendinblue"] = [
            (r.json()["headers"][MAIL_ID_HEADER], _answered(r, "messageId")) for r in self.brevo.requests
        ]
        out["sparkpost"] = [
            (r.json()["content"]["headers"][MAIL_ID_HEADER], _answered(r, "results", "id"))
            for r in self.sparkpost.requests
        ]
        out["smtp"] = [(mail_id, queue_id) for mail_id, queue_id in self.relay.delivered]
        return out

    async def _ses_sent(self) -> list[tuple[str, str | None]]:
        # Raw content keeps our header; moto keeps only subject and body of Simple content,
        # so those mails are traced by their subject, which names the mail (see ``mail``).
        data = await asyncio.to_thread(_moto_data, self.moto.url)
        records = data.get("ses", {})
        sent: list[tuple[str, str | None]] = []
        for raw in records.get("RawMessage", []):
            msg = email.message_from_string(raw["raw_data"], policy=policy.default)
            sent.append((str(msg[MAIL_ID_HEADER]), raw["id"]))
        for simple in records.get("Message", []):
            sent.append((f"subject:{simple['subject']}", simple["id"]))
        return sent


def _answered(request: RecordedRequest, *path: str) -> str | None:
    reply = request.reply
    if not isinstance(reply, Reply) or not 200 <= reply.status < 300:
        return None
    value: Any = reply.body
    for key in path:
        value = value[key]
    return str(value)


def _moto_data(url: str) -> Any:
    with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=5) as resp:
        return json.load(resp)


@pytest.fixture
async def doubles(moto: MotoSes, request: pytest.FixtureRequest) -> AsyncIterator[Doubles]:
    await asyncio.to_thread(_moto_reset, moto.url)  # forget what SES "sent" in earlier tests
    await moto.verify(SENDER)
    failing_sparkpost = getattr(request, "param", None) == "sparkpost-500"
    mailgun, brevo = MailgunDouble(), BrevoDouble()
    sparkpost = AlwaysFailing() if failing_sparkpost else SparkpostDouble()
    for double in (mailgun, brevo, sparkpost):
        await double.start()
    relay = QueueingRelay()
    smtp = Controller(relay, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        yield Doubles(moto, mailgun, brevo, sparkpost, relay, smtp)
    finally:
        smtp.stop()
        for double in (mailgun, brevo, sparkpost):
            await double.stop()


def _moto_reset(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=5).close()


# --- the run --------------------------------------------------------------------------


async def production_settings(make_settings: MakeSettings, d: Doubles, **keys: str) -> Settings:
    base = await make_settings()
    vendors = VendorsSettings(
        order=ORDER,
        amazon=ses_settings(d.moto.url, timeout_s=5.0),
        mailgun=MailgunSettings(
            domain=MAILGUN_DOMAIN,
            api_key=SecretStr(keys.get("mailgun", MAILGUN_KEY)),
            base_url=d.mailgun.base_url,
            timeout_s=5.0,
        ),
        sendinblue=SendinblueSettings(
            api_key=SecretStr(keys.get("sendinblue", BREVO_KEY)), base_url=d.brevo.base_url, timeout_s=5.0
        ),
        sparkpost=SparkpostSettings(
            api_key=SecretStr(keys.get("sparkpost", SPARKPOST_KEY)),
            base_url=d.sparkpost.base_url,
            timeout_s=5.0,
        ),
        smtp=SmtpSettings(host="127.0.0.1", port=d.smtp.port, starttls=False, timeout_s=5.0),
    )
    consumer = base.consumer.model_copy(
        update={
            "vendor_cooldown_s": COOLDOWN_S,
            "requeue_interval_s": 0.0,  # no sweep racing the jobs
            "reserve_timeout_s": 1,
            "grace_s": 5.0,
            "max_attempts": 5,
        }
    )
    return base.model_copy(update={"env": "production", "vendors": vendors, "consumer": consumer})


def mail(i: int) -> dict[str, Any]:
    data: dict[str, Any] = {
        "from": {"email": SENDER, "name": "Zoë Sender"},
        "to": [{"email": f"rcpt{i}@example.net", "name": f"Empfänger {i}"}],
        "subject": f"e2e Grüße #{i:03d}",
        "text": f"Hallo {i} 👋",
        "html": f"<p>Hallo {i} 👋</p>",
        "tags": ["e2e"],
    }
    if i % 3 == 0:  # not i % 2: with four vendors in rotation, each would get one parity
        # A non-ASCII header value: SES must take this one as Raw MIME, the others as Simple.
        data["headers"] = {"X-Campaign": "Frühling"}
    return data


@dataclass
class RunResult:
    records: dict[str, MailRecord]  # by mail id
    sent: dict[str, list[tuple[str, str | None]]]  # by vendor, what each double received
    registry_available: dict[str, bool]
    registry_until: dict[str, float]
    marks: dict[str, tuple[float, str]]  # the vendor_status collection after the run
    elapsed: float


async def run_end_to_end(settings: Settings, d: Doubles, n: int, concurrency: int) -> RunResult:
    vendors = build_vendors(settings)
    assert [v.name for v in vendors] == ORDER
    assert [type(v) for v in vendors] == [ADAPTERS[name] for name in ORDER]

    started = time.monotonic()
    async with Producer(settings) as producer:
        ids = await producer.send_many([mail(i) for i in range(n)])
    assert len(set(ids)) == n

    async with (
        MailStore(settings) as store,
        Consumer(settings, concurrency=concurrency, vendors=vendors) as c,
    ):
        run = asyncio.create_task(c.run())
        try:
            deadline = time.monotonic() + DEADLINE_S
            while True:
                counts = await store.status_counts()
                assert counts[Status.FAILED.value] == 0, counts
                if counts[Status.SENT.value] == n:
                    break
                assert not run.done(), "the consumer stopped early"
                assert time.monotonic() < deadline, f"not all sent within {DEADLINE_S:.0f} s: {counts}"
                await asyncio.sleep(0.05)
            now = time.time()
            available = {name: c.registry.is_available(name, now) for name in ORDER}
            until = {name: until for name, (until, _) in c.registry.snapshot().items()}
        finally:
            c.stop()
            await asyncio.wait_for(run, timeout=10)
    elapsed = time.monotonic() - started

    async with MailStore(settings) as store:
        by_id = {mail_id: await store.get(mail_id) for mail_id in ids}
        marks = await store.vendor_marks()
    return RunResult(by_id, await d.sent(), available, until, marks, elapsed)


def trace_key(record: MailRecord, vendor: str, sent_ids: set[str]) -> str:
    """How a double's record names this mail (moto's Simple records lose our header)."""
    if vendor == "amazon" and record.id not in sent_ids:
        return f"subject:{record.email.subject}"
    return record.id


def check_run(result: RunResult, failing: str, outcome: Outcome, reason: str, concurrency: int) -> None:
    healthy = [name for name in ORDER if name != failing]
    now = time.time()

    # Every mail sent once, by a healthy vendor, with the id that vendor's double answered for it.
    answered: dict[str, dict[str, str]] = {}
    for vendor in healthy:
        received = result.sent[vendor]
        counts = Counter(key for key, _ in received)
        assert all(k == 1 for k in counts.values()), f"{vendor} got a mail twice: {counts.most_common(3)}"
        assert all(message_id for _, message_id in received), f"{vendor} refused a request: {received}"
        answered[vendor] = {key: message_id for key, message_id in received if message_id}

    failed_attempts: list[Attempt] = []
    for record in result.records.values():
        assert record.status is Status.SENT, record
        assert record.vendor in healthy, (record.id, record.vendor)
        vendor = record.vendor
        key = trace_key(record, vendor, set(answered[vendor]))
        assert record.message_id == answered[vendor].get(key), (record.id, vendor, record.message_id)
        *earlier, last = record.attempts
        assert (last.vendor, last.outcome, last.message_id) == (vendor, "sent", record.message_id)
        # The only failures on the way are the failing vendor's, at most once per mail.
        assert all(a.vendor == failing and a.outcome == outcome for a in earlier), earlier
        assert len(earlier) <= 1
        failed_attempts += earlier

    for vendor in healthy:
        mine = {
            trace_key(r, vendor, set(answered[vendor])) for r in result.records.values() if r.vendor == vendor
        }
        assert set(answered[vendor]) == mine, (
            f"{vendor}: what the double received != the mails attributed to it"
        )
    assert sum(len(answered[v]) for v in healthy) == len(result.records)

    # The failing vendor was tried, every try is recorded on its mail, and once the first
    # failure was in, no further send reached it (the ones already in flight aside).
    tried = result.sent[failing]
    assert tried, f"{failing} was never tried"
    assert all(message_id is None for _, message_id in tried)
    assert len(tried) == len(failed_attempts) <= concurrency
    assert Counter(key for key, _ in tried) == Counter(
        record.id for record in result.records.values() for a in record.attempts if a.vendor == failing
    )
    first_failure = min(a.finished_at for a in failed_attempts)
    assert all(a.started_at <= first_failure for a in failed_attempts), (
        "a send began after the breaker opened"
    )
    assert all(reason in (a.error or "") for a in failed_attempts), failed_attempts[0].error

    # Marked unavailable for the cooldown: in this consumer, and for every consumer in MongoDB.
    assert result.registry_available == {name: name != failing for name in ORDER}
    assert now < result.registry_until[failing] <= now + COOLDOWN_S
    until, why = result.marks[failing]
    assert now < until <= now + COOLDOWN_S and reason in why
    assert all(result.marks.get(name, (0.0, ""))[0] == 0.0 for name in healthy), result.marks


def check_doubles_saw_valid_requests(d: Doubles) -> None:
    for double in (d.mailgun, d.brevo, d.sparkpost):
        assert [r.problems for r in double.requests if r.problems] == []


# --- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("doubles", ["sparkpost-500"], indirect=True)
async def test_a_vendor_answering_500_is_skipped_and_every_mail_goes_out_once(
    make_settings: MakeSettings, doubles: Doubles
) -> None:
    settings = await production_settings(make_settings, doubles)
    concurrency = 10
    result = await run_end_to_end(settings, doubles, n=60, concurrency=concurrency)

    check_doubles_saw_valid_requests(doubles)
    check_run(result, "sparkpost", "transient", "HTTP 500", concurrency)
    # The other four shared the load (round robin), and SES took both content kinds.
    by_vendor = Counter(r.vendor for r in result.records.values())
    assert set(by_vendor) == {"amazon", "mailgun", "sendinblue", "smtp"}, by_vendor
    assert min(by_vendor.values()) >= 5, by_vendor
    ses_keys = [key for key, _ in result.sent["amazon"]]
    assert any(k.startswith("subject:") for k in ses_keys) and any(
        not k.startswith("subject:") for k in ses_keys
    )
    assert result.elapsed < DEADLINE_S


async def test_a_vendor_refusing_our_key_is_marked_and_mails_go_elsewhere(
    make_settings: MakeSettings, doubles: Doubles
) -> None:
    settings = await production_settings(make_settings, doubles, sendinblue="xkeysib-revoked-key")
    concurrency = 5
    result = await run_end_to_end(settings, doubles, n=20, concurrency=concurrency)

    assert all(
        r.reply == Reply(401, {"code": "unauthorized", "message": "Key not found"})
        for r in doubles.brevo.requests
    )
    check_run(result, "sendinblue", "auth", "HTTP 401", concurrency)
    assert "xkeysib-revoked-key" not in repr(result.records) + repr(result.marks)
