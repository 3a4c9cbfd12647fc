"""SmtpVendor against a real local aiosmtpd server (its own thread and loop)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email
import ipaddress
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from mailer.config import SmtpSettings
from mailer.errors import (
    PermanentVendorError,
    TransientVendorError,
    UnsupportedByVendor,
    VendorAuthError,
    VendorConfigError,
    VendorThrottled,
)
from mailer.models import MAIL_ID_HEADER, Email, parse_email
from mailer.vendors.base import Vendor
from mailer.vendors.smtp import SmtpVendor

from .http_doubles import assert_no_secret
from .ses_doubles import free_port

pytestmark = pytest.mark.timeout(30)

PASSWORD = "s3cret-smtp-password"


@dataclass
class Delivered:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peer: Any

    def message(self) -> EmailMessage:
        # The bytes parser would surrogate-escape raw UTF-8 headers (SMTPUTF8 mail); decode first.
        msg = email.message_from_string(self.content.decode("utf-8"), policy=policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass
class Relay:
    """aiosmtpd handler: refuses recipients by local part, records what it accepts."""

    delivered: list[Delivered] = field(default_factory=list)
    data_reply: str = "250 2.0.0 Ok: queued as Q123ABC"
    data_delay: float = 0.0
    mail_replies: list[str] = field(default_factory=list)  # next MAIL FROM answers, then 250

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if self.mail_replies:
            return self.mail_replies.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        local = address.partition("@")[0]
        if local.startswith("reject"):
            return f"550 5.1.1 <{address}>: user unknown"
        if local.startswith("defer"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        content = envelope.original_content or envelope.content
        self.delivered.append(Delivered(envelope.mail_from, list(envelope.rcpt_tos), content, session.peer))
        return self.data_reply


def start_relay(relay: Relay, port: int | None = None, **smtp_kwargs: Any) -> Controller:
    controller = Controller(relay, hostname="127.0.0.1", port=port or free_port(), **smtp_kwargs)
    controller.start()
    return controller


@pytest.fixture
def relay() -> Iterator[tuple[Relay, Controller]]:
    handler = Relay()
    controller = start_relay(handler, enable_SMTPUTF8=True)
    yield handler, controller
    controller.stop()


def settings_for(controller: Controller, **updates: Any) -> SmtpSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": controller.port,
        "starttls": False,
        "timeout_s": 2.0,
    }
    values.update(updates)
    return SmtpSettings(**values)


def make_email(**fields: Any) -> Email:
    data: dict[str, Any] = {
        "from": {"email": "sender@example.com", "name": "Jürgen Müller"},
        "to": [{"email": "ann@example.net", "name": "Zoë, Ltd."}],
        "subject": "Grüße aus Köln ✉",
        "text": "hello\n.line starting with a dot\n",
    }
    data.update(fields)
    return parse_email(data)


async def test_delivers_headers_body_and_envelope(relay: tuple[Relay, Controller]) -> None:
    handler, controller = relay
    mail = make_email(
        html="<p>héllo</p>",
        cc=["Carl Çelik <carl@example.net>"],
        bcc=["hidden@example.org"],
        reply_to=["replies@example.com"],
        headers={"X-Campaign": "Frühling"},
    )
    async with SmtpVendor(settings_for(controller)) as vendor:
        result = await vendor.send(mail, "mail-0001")

    assert result.message_id == "Q123ABC"  # the relay named its queue id
    [got] = handler.delivered
    assert got.mail_from == "sender@example.com"
    assert got.rcpt_tos == ["ann@example.net", "carl@example.net", "hidden@example.org"]
    assert got.content.isascii()
    msg = got.message()
    assert msg["Subject"] == "Grüße aus Köln ✉"
    assert msg["From"].addresses[0].display_name == "Jürgen Müller"
    assert msg["To"].addresses[0].display_name == "Zoë, Ltd."
    assert msg["Cc"].addresses[0].display_name == "Carl Çelik"
    assert msg["Reply-To"].addresses[0].addr_spec == "replies@example.com"
    assert msg["Bcc"] is None and "hidden@example.org" not in got.content.decode()
    assert msg[MAIL_ID_HEADER] == "mail-0001"
    assert msg["X-Campaign"] == "Frühling"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@example.com>")
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert (
        text is not None and text.get_content().replace("\r\n", "\n") == "hello\n.line starting with a dot\n"
    )
    assert html is not None and html.get_content().replace("\r\n", "\n") == "<p>héllo</p>\n"


async def test_message_id_header_when_the_reply_names_no_queue_id(relay: tuple[Relay, Controller]) -> None:
    handler, controller = relay
    handler.data_reply = "250 OK"
    async with SmtpVendor(settings_for(controller)) as vendor:
        result = await vendor.send(make_email(), "mail-0002")
    assert result.message_id == handler.delivered[0].message()["Message-ID"]


async def test_connection_is_reused_across_sends(relay: tuple[Relay, Controller]) -> None:
    handler, controller = relay
    async with SmtpVendor(settings_for(controller)) as vendor:
        await vendor.send(make_email(), "a")
        with pytest.raises(PermanentVendorError):  # a refusal does not cost the connection
            await vendor.send(make_email(to=["reject@example.net"]), "b")
        await vendor.send(make_email(), "c")
    assert len(handler.delivered) == 2
    assert handler.delivered[0].peer == handler.delivered[1].peer


async def test_concurrent_sends_share_a_small_pool(relay: tuple[Relay, Controller]) -> None:
    handler, controller = relay
    async with SmtpVendor(settings_for(controller), max_connections=2) as vendor:
        await asyncio.gather(*(vendor.send(make_email(), f"m{i}") for i in range(6)))
    assert len(handler.delivered) == 6
    assert len({d.peer for d in handler.delivered}) <= 2


async def test_server_closing_an_idle_connection_is_retried_on_a_fresh_one(
    relay: tuple[Relay, Controller],
) -> None:
    handler, controller = relay
    async with SmtpVendor(settings_for(controller)) as vendor:
        await vendor.send(make_email(), "first")
        # What a relay says when its idle timer fires, read by us as the reply to MAIL FROM.
        handler.mail_replies.append("421 4.4.2 idle timeout, closing connection")
        await vendor.send(make_email(), "second")
    assert [d.message()[MAIL_ID_HEADER] for d in handler.delivered] == ["first", "second"]
    assert handler.delivered[0].peer != handler.delivered[1].peer


async def test_reconnects_after_the_server_restarted() -> None:
    handler = Relay()
    controller = start_relay(handler)
    port = controller.port
    try:
        async with SmtpVendor(settings_for(controller)) as vendor:
            await vendor.send(make_email(), "before")
            controller.stop()
            controller = start_relay(handler, port=port)
            await vendor.send(make_email(), "after")
    finally:
        controller.stop()
    assert [d.message()[MAIL_ID_HEADER] for d in handler.delivered] == ["before", "after"]


async def test_some_recipients_refused_permanently_still_sends_to_the_rest(
    relay: tuple[Relay, Controller],
) -> None:
    handler, controller = relay
    async with SmtpVendor(settings_for(controller)) as vendor:
        await vendor.send(make_email(to=["ann@example.net", "reject-me@example.net"]), "partial")
    assert handler.delivered[0].rcpt_tos == ["ann@example.net"]


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        (["reject@example.net"], PermanentVendorError),
        (["defer@example.net"], TransientVendorError),
        # A temporary refusal of one recipient aborts the whole mail: no partial delivery
        # that a failover would then duplicate.
        (["ann@example.net", "defer@example.net"], TransientVendorError),
    ],
)
async def test_recipient_refusals(
    relay: tuple[Relay, Controller], to: list[str], expected: type[Exception]
) -> None:
    handler, controller = relay
    async with SmtpVendor(settings_for(controller)) as vendor:
        with pytest.raises(expected, match="RCPT"):
            await vendor.send(make_email(to=to), "refused")
    assert handler.delivered == []


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("553 5.7.1 sender rejected", PermanentVendorError),
        ("451 4.3.0 local problem", TransientVendorError),
        ("451 4.7.1 too many messages, slow down", VendorThrottled),
        ("451 4.7.0 rate limit exceeded", VendorThrottled),
        ("450 4.7.1 too many messages", TransientVendorError),
        ("530 5.7.0 authentication required", VendorAuthError),
    ],
)
async def test_sender_refusals(
    relay: tuple[Relay, Controller], reply: str, expected: type[Exception]
) -> None:
    handler, controller = relay
    handler.mail_replies.append(reply)
    async with SmtpVendor(settings_for(controller)) as vendor:
        with pytest.raises(expected, match=reply.split()[0]) as info:
            await vendor.send(make_email(), "sender")
    assert type(info.value) is expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("554 5.6.0 message content rejected", PermanentVendorError),
        ("452 4.3.1 out of space", TransientVendorError),
    ],
)
async def test_data_refusals(relay: tuple[Relay, Controller], reply: str, expected: type[Exception]) -> None:
    handler, controller = relay
    handler.data_reply = reply
    async with SmtpVendor(settings_for(controller)) as vendor:
        with pytest.raises(expected, match="DATA") as info:
            await vendor.send(make_email(), "data")
    assert getattr(info.value, "ambiguous", False) is False


async def test_timeout_after_data_started_is_ambiguous(relay: tuple[Relay, Controller]) -> None:
    handler, controller = relay
    handler.data_delay = 1.0
    started = time.monotonic()
    async with SmtpVendor(settings_for(controller, timeout_s=0.3)) as vendor:
        with pytest.raises(TransientVendorError, match="timed out at DATA") as info:
            await vendor.send(make_email(), "slow")
    assert info.value.ambiguous is True
    assert time.monotonic() - started < 1.0


async def test_connection_refused_is_transient_not_ambiguous() -> None:
    settings = SmtpSettings(host="127.0.0.1", port=free_port(), starttls=False, timeout_s=1.0)
    async with SmtpVendor(settings) as vendor:
        with pytest.raises(TransientVendorError, match="cannot reach") as info:
            await vendor.send(make_email(), "refused")
    assert info.value.ambiguous is False


async def test_smtputf8_for_a_non_ascii_local_part(relay: tuple[Relay, Controller]) -> None:
    handler, controller = relay
    async with SmtpVendor(settings_for(controller)) as vendor:
        await vendor.send(make_email(to=["jörg@example.net"]), "utf8")
    [got] = handler.delivered
    assert got.rcpt_tos == ["jörg@example.net"]
    assert got.message()["To"].addresses[0].addr_spec == "jörg@example.net"


async def test_non_ascii_local_part_without_smtputf8_is_unsupported_by_this_vendor() -> None:
    handler = Relay()
    controller = start_relay(handler, enable_SMTPUTF8=False)
    try:
        async with SmtpVendor(settings_for(controller)) as vendor:
            with pytest.raises(UnsupportedByVendor, match="SMTPUTF8"):
                await vendor.send(make_email(to=["jörg@example.net"]), "utf8")
            await vendor.send(make_email(), "ascii")  # and the connection is still good
    finally:
        controller.stop()
    assert len(handler.delivered) == 1


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"mailer", PASSWORD.encode())
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 235/535


@pytest.fixture
def auth_relay() -> Iterator[tuple[Relay, Controller]]:
    handler = Relay()
    controller = start_relay(handler, authenticator=_authenticator, auth_require_tls=False)
    yield handler, controller
    controller.stop()


async def test_login(auth_relay: tuple[Relay, Controller]) -> None:
    handler, controller = auth_relay
    settings = settings_for(controller, username="mailer", password=SecretStr(PASSWORD))
    async with SmtpVendor(settings) as vendor:
        await vendor.send(make_email(), "authed")
    assert len(handler.delivered) == 1


async def test_login_failure_is_an_auth_error_without_the_password(
    auth_relay: tuple[Relay, Controller],
) -> None:
    handler, controller = auth_relay
    settings = settings_for(controller, username="mailer", password=SecretStr("wrong-" + PASSWORD))
    vendor = SmtpVendor(settings)
    async with vendor:
        with pytest.raises(VendorAuthError) as info:
            await vendor.send(make_email(), "bad-login")
    assert PASSWORD not in str(info.value) and PASSWORD not in repr(vendor)
    assert handler.delivered == []


async def test_a_reply_echoing_the_password_is_masked(auth_relay: tuple[Relay, Controller]) -> None:
    handler, controller = auth_relay
    plain = base64.b64encode(f"\0mailer\0{PASSWORD}".encode()).decode()  # AUTH PLAIN, as sent
    handler.mail_replies = [f"550 5.7.1 denied for AUTH PLAIN {plain} (password {PASSWORD})"]
    settings = settings_for(controller, username="mailer", password=SecretStr(PASSWORD))
    async with SmtpVendor(settings) as vendor:
        with pytest.raises(PermanentVendorError, match="550") as info:
            await vendor.send(make_email(), "echo")
    assert "***" in info.value.reason
    assert_no_secret((PASSWORD, plain), info.value)


async def test_lifecycle(relay: tuple[Relay, Controller]) -> None:
    _, controller = relay
    vendor = SmtpVendor(settings_for(controller), name="relay")
    assert isinstance(vendor, Vendor) and vendor.name == "relay"
    await vendor.send(make_email(), "lazy")  # opens on first use, no connect() needed
    await vendor.close()
    await vendor.close()
    await vendor.send(make_email(), "after-close")
    await vendor.close()


# --- TLS: STARTTLS to a relay with a private CA, one context for every connection ----------


@dataclass
class Pki:
    ca_file: str
    server: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a certificate it signed for 127.0.0.1: what a relay with a private CA has."""
    now = dt.datetime.now(dt.UTC)

    def cert(
        subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name, signer: rsa.RSAPrivateKey, ca: bool
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer if not ca else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        else:
            usage = x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            )
            builder = builder.add_extension(usage, critical=True)
        return builder.sign(signer, hashes.SHA256())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = cert("mailer test CA", ca_key, x509.Name([]), ca_key, ca=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = cert("127.0.0.1", key, ca.subject, ca_key, ca=False)
    folder = tmp_path_factory.mktemp("pki")
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "relay.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (folder / "relay.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(folder / "relay.pem", folder / "relay.key")
    return Pki(str(folder / "ca.pem"), server)


@pytest.fixture
def tls_relay(pki: Pki) -> Iterator[tuple[Relay, Controller]]:
    handler = Relay()
    controller = start_relay(handler, tls_context=pki.server, require_starttls=True)
    yield handler, controller
    controller.stop()


async def test_starttls_to_a_private_ca_relay_builds_one_context_for_every_connection(
    pki: Pki, tls_relay: tuple[Relay, Controller], monkeypatch: pytest.MonkeyPatch
) -> None:
    handler, controller = tls_relay
    built: list[object] = []
    real = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    vendor = SmtpVendor(settings_for(controller, starttls=True, ca_file=pki.ca_file))
    async with vendor:
        results = await asyncio.gather(*(vendor.send(make_email(), f"tls-{i}") for i in range(3)))
    assert all(r.message_id for r in results) and len(handler.delivered) == 3
    assert len(built) == 1  # at connect; aiosmtplib would build one per connection


async def test_a_relay_certificate_we_do_not_trust_is_a_settings_problem(
    tls_relay: tuple[Relay, Controller],
) -> None:
    handler, controller = tls_relay
    async with SmtpVendor(settings_for(controller, starttls=True)) as vendor:  # the system's CAs only
        with pytest.raises(VendorAuthError) as caught:
            await vendor.send(make_email(), "untrusted")
    assert "TLS" in str(caught.value) and "certificate verify failed" in str(caught.value)
    assert handler.delivered == []


async def test_an_unreadable_ca_file_is_refused_at_connect(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate")
    for ca_file in (str(bad), str(tmp_path / "missing.pem")):
        vendor = SmtpVendor(SmtpSettings(host="127.0.0.1", port=free_port(), ca_file=ca_file))
        with pytest.raises(VendorConfigError) as caught:
            await vendor.connect()
        assert "ca_file" in str(caught.value) and ca_file in str(caught.value)
