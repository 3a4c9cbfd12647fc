"""Webhook receivers against the running app (uvicorn) and the local services: for each
vendor a payload in the shape its documentation shows, authenticated by the test itself;
a tampered body, a wrong key, a stale timestamp and a replay are each refused (401, nothing
stored); an accepted hard bounce suppresses the address and the next send to it is refused.

SNS messages are signed with a key and self-signed certificate generated here and served
from 127.0.0.1, which the test configuration allowlists: nothing is fetched from the internet.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from helpers import mail
from pydantic import SecretStr
from schemathesis import GenerationMode
from test_events_store import drop_event_collections, sent_mail
from vendors.http_doubles import LoopbackServer

from mailer.config import (
    MailgunWebhookSettings,
    Settings,
    SnsWebhookSettings,
    WebhookCredentials,
    WebhooksSettings,
)
from mailer.service.webhooks.amazon import string_to_sign
from mailer.store import MailStore

from .conftest import AUTH, serving, serving_in_thread, with_api
from .test_schemathesis import _check as check_operation

SIGNING_KEY = "key-test-0123456789abcdef"
BREVO_TOKEN = "brevo-token-0123456789"
SPARK_USER, SPARK_PASSWORD = "sparkpost", "spark-password-0123"
TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
TOKEN = "2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a747ba6f3beb71854e285d6ad"


# --- a local SNS certificate server ---------------------------------------------------------


@dataclass
class CertServer(LoopbackServer):
    """Serves ``/cert.pem`` and records ``/confirm`` visits (the SubscribeURL)."""

    pem: bytes = b""
    confirmed: list[str] = field(default_factory=list)
    fetched: int = 0

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ")[1].decode()
            if path.startswith("/cert.pem"):
                self.fetched += 1
                body, status = self.pem, b"200 OK"
            elif path.startswith("/confirm"):
                self.confirmed.append(path)
                body, status = b"<ConfirmSubscriptionResponse/>", b"200 OK"
            else:
                body, status = b"", b"404 Not Found"
            head = b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode()
            writer.write(head + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        finally:
            writer.close()


@dataclass
class Signer:
    key: rsa.RSAPrivateKey
    pem: bytes

    @classmethod
    def generate(cls) -> Signer:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert.public_bytes(serialization.Encoding.PEM))

    def sign(self, message: dict[str, Any], version: str = "2") -> dict[str, Any]:
        algorithm = hashes.SHA256() if version == "2" else hashes.SHA1()
        signature = self.key.sign(string_to_sign(message), padding.PKCS1v15(), algorithm)
        return {**message, "SignatureVersion": version, "Signature": base64.b64encode(signature).decode()}


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.generate()


@pytest.fixture
async def certs(signer: Signer) -> AsyncIterator[CertServer]:
    server = CertServer(pem=signer.pem)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --- the app with webhook secrets -----------------------------------------------------------


def with_webhooks(settings: Settings, cert_origin: str) -> Settings:
    hooks = WebhooksSettings(
        mailgun=MailgunWebhookSettings(signing_key=SecretStr(SIGNING_KEY)),
        sendinblue=WebhookCredentials(token=SecretStr(BREVO_TOKEN)),
        sparkpost=WebhookCredentials(username=SPARK_USER, password=SecretStr(SPARK_PASSWORD)),
        amazon=SnsWebhookSettings(topic_arns=[TOPIC], cert_origins=[cert_origin.replace(".", r"\.")]),
    )
    return with_api(settings).model_copy(update={"webhooks": hooks})


@dataclass
class Rig:
    client: httpx.AsyncClient
    store: MailStore
    settings: Settings
    certs: CertServer

    async def counts(self) -> tuple[int, int, int]:
        return (
            await self.store.events.count_documents({}),
            await self.store.unknown_events.count_documents({}),
            await self.store.suppressions.count_documents({}),
        )


@pytest.fixture
async def rig(settings: Settings, certs: CertServer) -> AsyncIterator[Rig]:
    hooked = with_webhooks(settings, certs.origin)
    async with (
        serving(hooked) as (url, _),
        httpx.AsyncClient(base_url=url) as client,
        MailStore(hooked) as store,
    ):
        try:
            yield Rig(client, store, hooked, certs)
        finally:
            await drop_event_collections(store)


# --- Mailgun --------------------------------------------------------------------------------


def mailgun_body(
    event_data: dict[str, Any],
    *,
    key: str = SIGNING_KEY,
    timestamp: float | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    ts = str(int(time.time() if timestamp is None else timestamp))
    token = token or secrets.token_hex(25)
    signature = hmac.new(key.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
    return {"signature": {"timestamp": ts, "token": token, "signature": signature}, "event-data": event_data}


def mailgun_bounce(
    message_id: str, recipient: str = "rcpt1@example.com", event_id: str = "G9Bn5sl1TC6nu79C8C0bwg"
) -> dict[str, Any]:
    """A permanent failure, shaped as Mailgun's webhook sample (message id without brackets)."""
    return {
        "event": "failed",
        "severity": "permanent",
        "reason": "bounce",
        "id": event_id,
        "timestamp": 1521233195.375624,
        "log-level": "error",
        "recipient": recipient,
        "delivery-status": {
            "code": 550,
            "message": "5.1.1 The email account does not exist",
            "description": "",
        },
        "message": {"headers": {"to": recipient, "message-id": message_id.strip("<>"), "subject": "Hello 1"}},
        "user-variables": {},
        "flags": {"is-authenticated": True, "is-test-mode": False},
    }


async def test_mailgun_bounce_is_stored_suppresses_and_the_next_send_is_refused(rig: Rig) -> None:
    mail_id = await sent_mail(rig.store, 1, "<20130503192659.13651.20287@mg.example.com>")
    body = mailgun_body(mailgun_bounce("<20130503192659.13651.20287@mg.example.com>"))
    r = await rig.client.post("/v1/webhooks/mailgun", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "received": 1,
        "new": 1,
        "unknown": 0,
        "suppressed": 1,
        "duplicate": False,
        "note": None,
    }
    events = await rig.store.events_of(mail_id)
    assert [(e["type"], e["bounce"], e["raw_name"]) for e in events] == [("bounced", "hard", "failed")]
    assert (await rig.store.delivery_of(mail_id))["delivery"]["bounced"] is True
    assert await rig.store.get_suppression("rcpt1@example.com") is not None
    # The next send to that address is refused, through the API as through the SDK.
    refused = await rig.client.post("/v1/emails", json=mail(1), headers=AUTH)
    assert refused.status_code == 422 and "rcpt1@example.com" in refused.text
    # ... and the mail's status shows the event.
    status = (await rig.client.get(f"/v1/emails/{mail_id}", headers=AUTH)).json()
    assert [e["type"] for e in status["events"]] == ["bounced"] and status["delivery"]["bounced"] is True


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda b: b.update(mailgun_body(b["event-data"], key="key-wrong")), id="wrong-key"),
        pytest.param(
            lambda b: b.update(mailgun_body(b["event-data"], timestamp=time.time() - 3600)), id="stale"
        ),
        pytest.param(lambda b: b["signature"].pop("signature"), id="no-signature"),
    ],
)
async def test_mailgun_refuses_what_is_not_signed_now_by_the_key(
    rig: Rig, spoil: Callable[[dict[str, Any]], None]
) -> None:
    body = mailgun_body(mailgun_bounce("<x@mg.example.com>"))
    spoil(body)
    r = await rig.client.post("/v1/webhooks/mailgun", json=body)
    assert r.status_code == 401, r.text
    assert SIGNING_KEY not in r.text
    assert await rig.counts() == (0, 0, 0)


async def test_mailgun_replay_and_a_signature_reused_on_a_tampered_body_are_refused(rig: Rig) -> None:
    body = mailgun_body(mailgun_bounce("<x@mg.example.com>"))
    assert (await rig.client.post("/v1/webhooks/mailgun", json=body)).status_code == 200
    before = await rig.counts()
    replay = await rig.client.post("/v1/webhooks/mailgun", json=body)
    assert replay.status_code == 401 and "replay" in replay.text
    # Mailgun signs timestamp + token only: a captured signature on another body is refused
    # because its token is spent.
    tampered = {**body, "event-data": mailgun_bounce("<x@mg.example.com>", "victim@example.com", "other-id")}
    assert (await rig.client.post("/v1/webhooks/mailgun", json=tampered)).status_code == 401
    assert await rig.counts() == before == (0, 1, 1)  # an unknown mail's bounce: kept apart, still suppresses
    assert await rig.store.get_suppression("victim@example.com") is None


async def test_mailgun_redelivered_event_adds_nothing(rig: Rig) -> None:
    mail_id = await sent_mail(rig.store, 1, "<a@mg.example.com>")
    delivered = {**mailgun_bounce("<a@mg.example.com>"), "event": "delivered", "severity": None}
    for _ in range(2):  # Mailgun retries with a fresh signature: the event's id is the same
        r = await rig.client.post("/v1/webhooks/mailgun", json=mailgun_body(delivered))
        assert r.status_code == 200
    assert r.json()["new"] == 0
    assert len(await rig.store.events_of(mail_id)) == 1
    assert (await rig.store.delivery_of(mail_id))["delivery"]["events"] == 1


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"signature": {}}'])
async def test_mailgun_malformed_or_unsigned_is_refused(rig: Rig, body: bytes) -> None:
    r = await rig.client.post("/v1/webhooks/mailgun", content=body)
    assert r.status_code in (400, 401) and r.json()["errors"]
    assert await rig.counts() == (0, 0, 0)


# --- Brevo ----------------------------------------------------------------------------------


def brevo_event(
    message_id: str, event: str = "hard_bounce", email: str = "rcpt2@example.com"
) -> dict[str, Any]:
    """Shaped as Brevo's transactional webhook payload."""
    return {
        "event": event,
        "email": email,
        "id": 123456,
        "date": "2026-01-02 10:00:00",
        "ts": 1767348000,
        "message-id": message_id,
        "ts_event": 1767348000,
        "subject": "Hello 2",
        "tag": "",
        "sending_ip": "185.41.28.109",
        "ts_epoch": 1767348000123,
        "reason": "550 5.1.1 unknown user",
    }


async def test_brevo_bearer_token_and_basic_auth(rig: Rig) -> None:
    mail_id = await sent_mail(rig.store, 2, "<202601021000.12345@smtp-relay.mailin.fr>")
    body = brevo_event("<202601021000.12345@smtp-relay.mailin.fr>")
    ok = await rig.client.post(
        "/v1/webhooks/sendinblue", json=body, headers={"Authorization": f"Bearer {BREVO_TOKEN}"}
    )
    assert ok.status_code == 200 and ok.json()["suppressed"] == 1, ok.text
    assert [e["bounce"] for e in await rig.store.events_of(mail_id)] == ["hard"]
    again = await rig.client.post(
        "/v1/webhooks/sendinblue", json=body, headers={"Authorization": f"Bearer {BREVO_TOKEN}"}
    )
    assert again.json()["new"] == 0  # a redelivery adds nothing
    for bad in (
        {"Authorization": "Bearer wrong-token"},
        {},
        {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()},
    ):
        r = await rig.client.post(
            "/v1/webhooks/sendinblue", json=brevo_event("<other@x>", "spam"), headers=bad
        )
        assert r.status_code == 401 and BREVO_TOKEN not in r.text
    assert await rig.counts() == (1, 0, 1)


# --- SparkPost ------------------------------------------------------------------------------


def spark_batch(transmission_id: str) -> list[dict[str, Any]]:
    """Shaped as SparkPost's webhook batch: message and track events, and a ping."""
    base = {
        "transmission_id": transmission_id,
        "raw_rcpt_to": "Rcpt3@Example.com",
        "rcpt_to": "rcpt3@example.com",
    }
    return [
        {
            "msys": {
                "message_event": {
                    **base,
                    "type": "delivery",
                    "event_id": "92356927693813856",
                    "timestamp": "1767348000",
                }
            }
        },
        {
            "msys": {
                "track_event": {
                    **base,
                    "type": "open",
                    "event_id": "92356927693813857",
                    "timestamp": "1767348100",
                }
            }
        },
        {
            "msys": {
                "message_event": {
                    **base,
                    "type": "bounce",
                    "bounce_class": "10",
                    "raw_reason": "550 5.1.1 user unknown",
                    "event_id": "92356927693813858",
                    "timestamp": "1767348200",
                }
            }
        },
        {"msys": {}},
    ]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def test_sparkpost_batch_is_taken_once(rig: Rig) -> None:
    mail_id = await sent_mail(rig.store, 3, "84739201983746")
    headers = {
        **basic(SPARK_USER, SPARK_PASSWORD),
        "X-MessageSystems-Batch-ID": "77c2b630-d009-11e3-a8a0-0acd83b6a8b2",
    }
    r = await rig.client.post("/v1/webhooks/sparkpost", json=spark_batch("84739201983746"), headers=headers)
    assert r.status_code == 200 and (r.json()["received"], r.json()["new"], r.json()["suppressed"]) == (
        3,
        3,
        1,
    ), r.text
    summary = (await rig.store.delivery_of(mail_id))["delivery"]
    assert (
        summary["delivered_at"] == dt.datetime.fromtimestamp(1767348000, dt.UTC)
        and summary["bounce"] == "hard"
    )
    assert await rig.store.get_suppression("Rcpt3@example.com") is not None  # the local part as given
    again = await rig.client.post(
        "/v1/webhooks/sparkpost", json=spark_batch("84739201983746"), headers=headers
    )
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert await rig.counts() == (3, 0, 1)


@pytest.mark.parametrize(
    "headers",
    [
        basic(SPARK_USER, "wrong"),
        basic("someone", SPARK_PASSWORD),
        {"Authorization": f"Bearer {SPARK_PASSWORD}"},
        {},
    ],
)
async def test_sparkpost_wrong_credentials_store_nothing(rig: Rig, headers: dict[str, str]) -> None:
    r = await rig.client.post("/v1/webhooks/sparkpost", json=spark_batch("1"), headers=headers)
    assert r.status_code == 401 and SPARK_PASSWORD not in r.text
    assert await rig.counts() == (0, 0, 0)


async def test_sparkpost_malformed_batch_is_400(rig: Rig) -> None:
    auth = basic(SPARK_USER, SPARK_PASSWORD)
    for body in (
        {"msys": {}},
        [{"msys": {"a": {}, "b": {}}}],
        [{"msys": {"message_event": {"type": "delivery"}}}],
    ):
        r = await rig.client.post("/v1/webhooks/sparkpost", json=body, headers=auth)
        assert r.status_code == 400, r.text
    assert await rig.counts() == (0, 0, 0)


# --- Amazon SES through SNS -----------------------------------------------------------------


def ses_bounce(message_id: str, mailer_id: str | None = None) -> dict[str, Any]:
    headers = [{"name": "X-Mailer-Id", "value": mailer_id}] if mailer_id else []
    return {
        "eventType": "Bounce",
        "bounce": {
            "bounceType": "Permanent",
            "bounceSubType": "General",
            "bouncedRecipients": [
                {"emailAddress": "rcpt4@example.com", "action": "failed", "diagnosticCode": "smtp; 550"}
            ],
            "timestamp": "2026-01-02T10:00:00.000Z",
            "feedbackId": "0100-feedback",
        },
        "mail": {
            "timestamp": "2026-01-02T09:59:59.000Z",
            "messageId": message_id,
            "destination": ["rcpt4@example.com"],
            "headers": headers,
        },
    }


def sns_notification(
    certs: CertServer, event: dict[str, Any], message_id: str = "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324"
) -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": message_id,
        "TopicArn": TOPIC,
        "Message": json.dumps(event),
        "Timestamp": "2026-01-02T10:00:01.000Z",
        "SigningCertURL": f"{certs.origin}/cert.pem",
        "UnsubscribeURL": f"{certs.origin}/?Action=Unsubscribe",
    }


def sns_headers(message: dict[str, Any]) -> dict[str, str]:
    return {"x-amz-sns-message-type": message["Type"], "x-amz-sns-message-id": message["MessageId"]}


@pytest.mark.parametrize("version", ["1", "2"])
async def test_sns_signed_ses_bounce_is_stored(rig: Rig, signer: Signer, version: str) -> None:
    mail_id = await sent_mail(rig.store, 4, "0100018d-ses-message-id")
    message = signer.sign(sns_notification(rig.certs, ses_bounce("0100018d-ses-message-id")), version)
    r = await rig.client.post(
        "/v1/webhooks/amazon", content=json.dumps(message), headers=sns_headers(message)
    )
    assert r.status_code == 200 and r.json()["suppressed"] == 1, r.text
    assert [e["type"] for e in await rig.store.events_of(mail_id)] == ["bounced"]
    again = await rig.client.post(
        "/v1/webhooks/amazon", content=json.dumps(message), headers=sns_headers(message)
    )
    assert again.json()["new"] == 0 and rig.certs.fetched == 1  # the certificate is fetched once


async def test_sns_event_attaches_by_our_header_when_the_message_id_is_unknown(
    rig: Rig, signer: Signer
) -> None:
    mail_id = await sent_mail(rig.store, 4, None)
    message = signer.sign(sns_notification(rig.certs, ses_bounce("never-recorded", mailer_id=mail_id)))
    r = await rig.client.post(
        "/v1/webhooks/amazon", content=json.dumps(message), headers=sns_headers(message)
    )
    assert r.status_code == 200 and r.json()["unknown"] == 0
    assert len(await rig.store.events_of(mail_id)) == 1


async def test_sns_subscription_is_confirmed(rig: Rig, signer: Signer) -> None:
    message = signer.sign(
        {
            "Type": "SubscriptionConfirmation",
            "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
            "Token": TOKEN,
            "TopicArn": TOPIC,
            "Message": f"You have chosen to subscribe to the topic {TOPIC}.\nTo confirm the subscription, "
            "visit the SubscribeURL included in this message.",
            "SubscribeURL": f"{rig.certs.origin}/confirm?Action=ConfirmSubscription&Token=1",
            "Timestamp": "2026-01-02T10:00:00.000Z",
            "SigningCertURL": f"{rig.certs.origin}/cert.pem",
        }
    )
    r = await rig.client.post(
        "/v1/webhooks/amazon", content=json.dumps(message), headers=sns_headers(message)
    )
    assert r.status_code == 200 and r.json()["note"] == "subscription confirmed", r.text
    assert len(rig.certs.confirmed) == 1


def _tamper(m: dict[str, Any]) -> None:
    event = json.loads(m["Message"])
    event["bounce"]["bouncedRecipients"][0]["emailAddress"] = "victim@example.com"
    m["Message"] = json.dumps(event)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(_tamper, id="tampered-body"),
        pytest.param(
            lambda m: m.update(TopicArn="arn:aws:sns:us-east-1:999999999999:theirs"), id="other-topic"
        ),
        pytest.param(
            lambda m: m.update(SigningCertURL="https://attacker.example.com/cert.pem"), id="cert-host"
        ),
        pytest.param(lambda m: m.update(SignatureVersion="3"), id="signature-version"),
        pytest.param(lambda m: m.update(Signature="bm90IGEgc2lnbmF0dXJl"), id="wrong-signature"),
    ],
)
async def test_sns_refuses_what_amazon_did_not_sign_for_our_topic(
    rig: Rig, signer: Signer, spoil: Callable[[dict[str, Any]], None]
) -> None:
    message = signer.sign(sns_notification(rig.certs, ses_bounce("0100-x")))
    spoil(message)
    r = await rig.client.post(
        "/v1/webhooks/amazon", content=json.dumps(message), headers=sns_headers(message)
    )
    assert r.status_code == 401, r.text
    assert await rig.counts() == (0, 0, 0)


async def test_sns_signed_with_another_key_is_refused(rig: Rig) -> None:
    other = Signer.generate()  # not the key of the served certificate
    message = other.sign(sns_notification(rig.certs, ses_bounce("0100-x")))
    r = await rig.client.post(
        "/v1/webhooks/amazon", content=json.dumps(message), headers=sns_headers(message)
    )
    assert r.status_code == 401 and await rig.counts() == (0, 0, 0)


@pytest.mark.parametrize("body", [b"{", b'{"Type": "Nonsense"}', b"[1]"])
async def test_sns_malformed_is_400(rig: Rig, body: bytes) -> None:
    r = await rig.client.post("/v1/webhooks/amazon", content=body)
    assert r.status_code == 400, r.text


async def test_unknown_vendor_is_422(rig: Rig) -> None:
    assert (await rig.client.post("/v1/webhooks/postmark", json={})).status_code == 422


# --- the suppression list by hand -----------------------------------------------------------


async def test_suppressions_api(rig: Rig) -> None:
    add = await rig.client.post("/v1/suppressions", json={"address": "Ann@EXAMPLE.com"}, headers=AUTH)
    assert add.status_code == 200 and add.json() == {"address": "Ann@example.com", "changed": True}
    assert (
        await rig.client.post("/v1/suppressions", json={"address": "Ann@example.com"}, headers=AUTH)
    ).json()["changed"] is False
    bad = await rig.client.post("/v1/suppressions", json={"address": "not an address"}, headers=AUTH)
    assert bad.status_code == 422
    page = (await rig.client.get("/v1/suppressions", params={"limit": 1}, headers=AUTH)).json()
    assert [s["address"] for s in page["suppressions"]] == ["Ann@example.com"] and page[
        "next"
    ] == "Ann@example.com"
    assert (
        await rig.client.post("/v1/emails", json=mail(1, to="Ann@example.com"), headers=AUTH)
    ).status_code == 422
    assert (await rig.client.delete("/v1/suppressions/Ann@Example.com", headers=AUTH)).status_code == 200
    assert (await rig.client.delete("/v1/suppressions/Ann@Example.com", headers=AUTH)).status_code == 404
    assert (
        await rig.client.post("/v1/emails", json=mail(1, to="Ann@example.com"), headers=AUTH)
    ).status_code == 202
    assert (await rig.client.get("/v1/suppressions")).status_code == 401  # behind [api] keys


async def test_batch_refuses_a_suppressed_mail_alone(rig: Rig) -> None:
    await rig.store.add_suppression("rcpt1@example.com", reason="complained")
    batch = {"emails": [mail(0, to="not-an-address"), mail(1), mail(2)]}
    r = await rig.client.post("/v1/emails/batch", json=batch, headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (1, 2)
    assert body["results"][0]["errors"][0]["field"] == "emails[0].to[0].email"
    assert body["results"][1]["errors"][0]["field"] == "emails[1].to"
    assert "rcpt1@example.com" in body["results"][1]["errors"][0]["message"]
    assert body["results"][2]["queued"] is True
    assert await rig.store.mails.count_documents({}) == 1


# --- schemathesis over the new routes -------------------------------------------------------


def _conforms(settings: Settings) -> None:
    with serving_in_thread(with_webhooks(settings, "http://127.0.0.1:9")) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [r.ok() for r in schema.get_all_operations()]
        ours = [op for op in operations if op.path.startswith(("/v1/webhooks", "/v1/suppressions"))]
        assert {op.label for op in ours} == {
            "POST /v1/webhooks/{vendor}",
            "GET /v1/suppressions",
            "POST /v1/suppressions",
            "DELETE /v1/suppressions/{address}",
        }
        for operation, mode in itertools.product(ours, GenerationMode):
            check_operation(operation, mode, url)


async def test_new_routes_conform_to_the_schema(settings: Settings) -> None:
    """The webhook and suppression routes: never a 5xx, valid answers as documented."""
    try:
        await asyncio.to_thread(_conforms, settings)
    finally:
        async with MailStore(settings) as store:
            await drop_event_collections(store)


async def test_the_mailgun_key_may_sit_in_the_vendor_section(settings: Settings) -> None:
    """``[vendors.mailgun] webhook_signing_key`` (the issue's name) works like ``[webhooks.mailgun]
    signing_key``."""
    from mailer.config import MailgunSettings
    from mailer.service.webhooks import build_receivers

    key = "vendor-section-key-0123"
    vendor = MailgunSettings(
        domain="mg.example.com", api_key=SecretStr("k"), webhook_signing_key=SecretStr(key)
    )
    on_vendor = settings.model_copy(
        update={"vendors": settings.vendors.model_copy(update={"mailgun": vendor})}
    )
    receiver = build_receivers(on_vendor)["mailgun"]
    async with MailStore(on_vendor) as store:
        await _verify_both(receiver, store, key)


async def _verify_both(receiver: Any, store: MailStore, key: str) -> None:
    from mailer.errors import WebhookRefused

    good = json.dumps(mailgun_body(mailgun_bounce("<m1@mg.example.com>"), key=key)).encode()
    assert len((await receiver.verify({}, good, store)).events) == 1
    with pytest.raises(WebhookRefused):
        bad = json.dumps(mailgun_body(mailgun_bounce("<m1@mg.example.com>"), key="other")).encode()
        await receiver.verify({}, bad, store)
