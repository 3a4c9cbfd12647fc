"""Local stand-ins for the vendors' HTTP APIs, listening on 127.0.0.1 only.

A real HTTP/1.1 server on a real socket (not respx) because the cases failover depends on only
happen honestly there: a vendor that reads the request and never answers, a connection closed
after the request was read, and keep-alive reuse of one connection across sends.

Each double checks a request the way its vendor would (path, auth, content type, fields),
records it with the problems found, and answers either with the vendor's documented error for
the first problem or with its success body. Tests can script the next answers instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import http
import itertools
import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from mailer.models import Email, parse_email

MAILGUN_KEY = "key-mg-5ecret-0123456789abcdef"
BREVO_KEY = "xkeysib-5ecret-0123456789abcdef-brevo"
SPARKPOST_KEY = "sp-5ecret-0123456789abcdef0123456789"
MAILGUN_DOMAIN = "mg.example.com"


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None  # dict/list: JSON; str: text/plain
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hang:
    """Read the request, then say nothing until the client hangs up."""


@dataclass(frozen=True)
class Drop:
    """Read the request, then close the connection without a word."""


@dataclass(frozen=True)
class Trickle:
    """Read the request, then send ``reply`` one byte every ``interval`` seconds.

    Each byte arrives well within any per-read timeout, so only a deadline on the whole
    send stops a client from waiting for the full answer (hundreds of bytes: minutes).
    """

    reply: Reply
    interval: float = 0.2


@dataclass(frozen=True)
class Echo:
    """Answer ``status`` with a body that quotes every request header, as a debugging proxy
    or a careless vendor does, in the shapes Mailgun, Brevo and SparkPost read (or as text)."""

    status: int
    as_text: bool = False


Action = Reply | Hang | Drop | Trickle | Echo


@dataclass(frozen=True)
class FormPart:
    name: str
    value: bytes
    filename: str | None = None
    content_type: str | None = None

    @property
    def text(self) -> str:
        return self.value.decode()


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    connection: int  # one number per TCP connection the double accepted
    problems: list[str] = field(default_factory=list)
    reply: Action | None = None  # what the double answered (set once it has decided)

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> list[FormPart]:
        ctype = self.headers.get("content-type", "")
        if ctype.startswith("application/x-www-form-urlencoded"):
            return [FormPart(k, v.encode()) for k, v in parse_qsl(self.body.decode(), keep_blank_values=True)]
        match = re.search(r'boundary="?([^";]+)"?', ctype)
        if not ctype.startswith("multipart/form-data") or not match:
            raise ValueError(f"not a form: {ctype!r}")
        return _parse_multipart(self.body, match.group(1).encode())

    def fields(self, name: str) -> list[str]:
        return [p.text for p in self.form() if p.name == name]


def _parse_multipart(body: bytes, boundary: bytes) -> list[FormPart]:
    delimiter = b"--" + boundary
    if not body.startswith(delimiter) or not body.rstrip().endswith(delimiter + b"--"):
        raise ValueError("multipart body does not start and end with its boundary")
    parts = []
    for chunk in body.split(delimiter)[1:-1]:
        head, sep, value = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep or not value.endswith(b"\r\n"):
            raise ValueError("malformed multipart part")
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.decode().partition(":") for line in head.split(b"\r\n"))
        )
        params = dict(re.findall(r'(\w+)="([^"]*)"', headers.get("content-disposition", "")))
        name = params["name"].replace("%22", '"').replace("\\\\", "\\")  # HTML5 form-data escaping
        parts.append(FormPart(name, value[:-2], params.get("filename"), headers.get("content-type")))
    return parts


class LoopbackServer:
    """An asyncio server on a free 127.0.0.1 port whose connection tasks die with ``stop``;
    subclasses implement ``_serve`` (which adds its task to ``_tasks``)."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections = itertools.count(1)
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class HttpDouble(LoopbackServer):
    """The server and its recording; subclasses add the vendor's checks and answers."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[RecordedRequest] = []
        self._script: deque[Action] = deque()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *actions: Action) -> None:
        """Answer the next requests with these, in order, whatever the checks say."""
        self._script.extend(actions)

    def check(self, request: RecordedRequest) -> Reply | None:
        """Append problems to ``request.problems``; return the vendor's refusal, if any."""
        raise NotImplementedError

    def success(self, request: RecordedRequest) -> Reply:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = next(self._connections)
        try:
            while (request := await _read_request(reader, connection)) is not None:
                self.requests.append(request)
                refusal = self.check(request)
                action = self._script.popleft() if self._script else refusal or self.success(request)
                request.reply = action
                if isinstance(action, Hang):
                    await reader.read()  # returns at EOF, when the client gives up
                    return
                if isinstance(action, Drop):
                    return
                if isinstance(action, Trickle):
                    for byte in _encode(action.reply):
                        writer.write(bytes((byte,)))
                        await writer.drain()
                        await asyncio.sleep(action.interval)
                    continue
                reply = _echo(action, request) if isinstance(action, Echo) else action
                writer.write(_encode(reply))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader, connection: int) -> RecordedRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed an idle keep-alive connection
    request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
    method, path, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RecordedRequest(method, path, headers, body, connection)


def _echo(echo: Echo, request: RecordedRequest) -> Reply:
    said = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
    text = f"rejected request with headers {said}"
    if echo.as_text:
        return Reply(echo.status, text)
    body = {"message": text, "code": "invalid_parameter", "errors": [{"message": text, "code": "1300"}]}
    return Reply(echo.status, body)


def _encode(reply: Reply) -> bytes:
    if isinstance(reply.body, str):
        body, ctype = reply.body.encode(), "text/plain; charset=utf-8"
    elif reply.body is None:
        body, ctype = b"", "text/plain"
    else:
        body, ctype = json.dumps(reply.body).encode(), "application/json"
    try:
        reason = http.HTTPStatus(reply.status).phrase
    except ValueError:
        reason = "Unknown"
    headers = {"Content-Type": ctype, "Content-Length": str(len(body)), **reply.headers}
    lines = [f"HTTP/1.1 {reply.status} {reason}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _valid_base64(value: Any) -> bool:
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return False
    return isinstance(value, str)


def _check_address(problems: list[str], where: str, value: Any) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("email"), str) or "@" not in value["email"]:
        problems.append(f"{where}: not an address object with an email: {value!r}")
        return
    if "name" in value and not (isinstance(value["name"], str) and value["name"]):
        problems.append(f"{where}: name must be a non-empty string when given: {value['name']!r}")


def _check_json(request: RecordedRequest, problems: list[str]) -> Any:
    if not request.headers.get("content-type", "").startswith("application/json"):
        problems.append(f"content-type is {request.headers.get('content-type')!r}, not application/json")
    try:
        return json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        problems.append("body is not UTF-8 JSON")
        return None


# --- Mailgun ---------------------------------------------------------------------------


class MailgunDouble(HttpDouble):
    """``POST /v3/{domain}/messages``, basic auth ``api:<key>``, form fields."""

    max_tags = 3

    def __init__(self, domain: str = MAILGUN_DOMAIN, api_key: str = MAILGUN_KEY) -> None:
        super().__init__()
        self.domain = domain
        self.auth = "Basic " + base64.b64encode(f"api:{api_key}".encode()).decode()

    def check(self, request: RecordedRequest) -> Reply | None:
        p = request.problems
        if request.method != "POST" or request.path != f"/v3/{self.domain}/messages":
            p.append(f"unexpected {request.method} {request.path}")
            return Reply(404, {"message": "Domain not found"})
        if request.headers.get("authorization") != self.auth:
            p.append("wrong or missing basic auth")
            return Reply(401, "Forbidden")
        try:
            form = request.form()
        except (ValueError, KeyError) as exc:
            p.append(f"unreadable form: {exc}")
            return Reply(400, {"message": "unreadable form"})
        names = [part.name for part in form]
        for required in ("from", "to", "subject"):
            if required not in names:
                p.append(f"{required} missing")
        if "text" not in names and "html" not in names:
            p.append("text or html missing")
        for part in form:
            if part.name in ("from", "to", "cc", "bcc") and "@" not in part.text:
                p.append(f"{part.name} is not a valid address: {part.text!r}")
            if part.name == "attachment" and not part.filename:
                p.append("attachment without a filename")
            if part.name != "attachment" and part.filename:
                p.append(f"field {part.name} sent as a file")
        if names.count("o:tag") > self.max_tags:
            p.append("too many tags")
        return Reply(400, {"message": p[0]}) if p else None

    def success(self, request: RecordedRequest) -> Reply:
        n = len(self.requests)
        return Reply(200, {"id": f"<20260101120000.{n}.abc@{self.domain}>", "message": "Queued. Thank you."})


# --- Brevo -----------------------------------------------------------------------------

_BREVO_KEYS = {
    "sender", "to", "cc", "bcc", "replyTo", "subject", "htmlContent", "textContent",
    "headers", "tags", "attachment",
}  # fmt: skip


class BrevoDouble(HttpDouble):
    """``POST /v3/smtp/email``, header ``api-key``, JSON in and out."""

    def __init__(self, api_key: str = BREVO_KEY) -> None:
        super().__init__()
        self.api_key = api_key

    def check(self, request: RecordedRequest) -> Reply | None:
        p = request.problems
        if request.method != "POST" or request.path != "/v3/smtp/email":
            p.append(f"unexpected {request.method} {request.path}")
            return Reply(404, {"code": "not_found", "message": "Invalid route"})
        if request.headers.get("api-key") != self.api_key:
            p.append("wrong or missing api-key")
            return Reply(401, {"code": "unauthorized", "message": "Key not found"})
        if request.headers.get("accept") != "application/json":
            p.append(f"accept is {request.headers.get('accept')!r}")
        body = _check_json(request, p)
        if not isinstance(body, dict):
            return Reply(400, {"code": "bad_request", "message": "Input must be a JSON object"})
        p += [f"unknown field {k}" for k in body.keys() - _BREVO_KEYS]
        _check_address(p, "sender", body.get("sender"))
        if not body.get("to"):
            p.append("to missing")
        for kind in ("to", "cc", "bcc"):
            for i, a in enumerate(body.get(kind, [])):
                _check_address(p, f"{kind}[{i}]", a)
        if "replyTo" in body:
            _check_address(p, "replyTo", body["replyTo"])
        if not body.get("subject"):
            p.append("subject missing")
        if not (body.get("htmlContent") or body.get("textContent")):
            p.append("htmlContent or textContent missing")
        headers = body.get("headers", {})
        if not (isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values())):
            p.append("headers must map names to strings")
        for i, att in enumerate(body.get("attachment", [])):
            if set(att) != {"name", "content"} or not _valid_base64(att.get("content")):
                p.append(f"attachment[{i}] needs name and base64 content")
        if p:
            return Reply(400, {"code": "invalid_parameter", "message": p[0]})
        return None

    def success(self, request: RecordedRequest) -> Reply:
        return Reply(201, {"messageId": f"<202601011200.{len(self.requests)}@smtp-relay.mailin.fr>"})


# --- SparkPost -------------------------------------------------------------------------


class SparkpostDouble(HttpDouble):
    """``POST /api/v1/transmissions``, header ``Authorization: <key>``, JSON in and out."""

    def __init__(self, api_key: str = SPARKPOST_KEY) -> None:
        super().__init__()
        self.api_key = api_key

    def check(self, request: RecordedRequest) -> Reply | None:
        p = request.problems
        if request.method != "POST" or request.path != "/api/v1/transmissions":
            p.append(f"unexpected {request.method} {request.path}")
            return Reply(404, {"errors": [{"message": "invalid URI", "code": "1101"}]})
        if request.headers.get("authorization") != self.api_key:
            p.append("wrong or missing Authorization (the bare key, no scheme)")
            return Reply(401, {"errors": [{"message": "Unauthorized."}]})
        body = _check_json(request, p)
        if not isinstance(body, dict):
            return Reply(400, {"errors": [{"message": "invalid data format", "code": "1300"}]})
        p += [f"unknown field {k}" for k in body.keys() - {"recipients", "content", "metadata", "options"}]
        recipients = body.get("recipients")
        if not recipients:
            p.append("recipients missing")
        for i, r in enumerate(recipients or []):
            address = r.get("address") if isinstance(r, dict) else None
            _check_address(p, f"recipients[{i}].address", address)
            if isinstance(address, dict) and not isinstance(address.get("header_to", ""), str):
                p.append(f"recipients[{i}].address.header_to must be a string")
        content = body.get("content")
        if not isinstance(content, dict):
            p.append("content missing")
            content = {}
        _check_address(p, "content.from", content.get("from"))
        if not content.get("subject"):
            p.append("content.subject missing")
        if not (content.get("text") or content.get("html")):
            p.append("content.text or content.html missing")
        for key in ("reply_to",):
            if key in content and not isinstance(content[key], str):
                p.append(f"content.{key} must be a string")
        headers = content.get("headers", {})
        if not (isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values())):
            p.append("content.headers must map names to strings")
        for i, att in enumerate(content.get("attachments", [])):
            if set(att) != {"name", "type", "data"} or not _valid_base64(att.get("data")):
                p.append(f"content.attachments[{i}] needs name, type and base64 data")
        if not isinstance(body.get("metadata", {}), dict):
            p.append("metadata must be an object")
        if p:
            error = {"message": "invalid data format/type/length", "code": "1300", "description": p[0]}
            return Reply(422, {"errors": [error]})
        return None

    def success(self, request: RecordedRequest) -> Reply:
        n = len(request.json()["recipients"])
        results = {"total_rejected_recipients": 0, "total_accepted_recipients": n, "id": f"1166878748495{n}"}
        return Reply(200, {"results": results})


# --- SES v2 (restJson) ---------------------------------------------------------------


class SesDouble(HttpDouble):
    """``POST /v2/email/outbound-emails``, SigV4 (not verified), JSON in and out: enough of
    SES v2's wire format for botocore to parse a success or an ``x-amzn-ErrorType`` error."""

    def check(self, request: RecordedRequest) -> Reply | None:
        if request.method != "POST" or request.path != "/v2/email/outbound-emails":
            request.problems.append(f"unexpected {request.method} {request.path}")
            return Reply(404, {"message": "not found"}, {"x-amzn-ErrorType": "NotFoundException"})
        if not request.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 "):
            request.problems.append("not signed with SigV4")
            return Reply(403, {"message": "missing signature"}, {"x-amzn-ErrorType": "IncompleteSignature"})
        return None

    def success(self, request: RecordedRequest) -> Reply:
        return Reply(200, {"MessageId": f"ses-{len(self.requests)}"})


# --- what the tests send and check -----------------------------------------------------

SUBJECT = "Grüße aus Zürich — 你好 ✉"
PDF = b"%PDF-1.4\x00\xff\xfe binary \r\n bytes"


def sample_email(**changes: Any) -> Email:
    """A mail that uses every field the adapters map, with Unicode where it can hide bugs."""
    data: dict[str, Any] = {
        "from": "Zoë Ünïcode <sender@example.com>",
        "to": ["Ann Example <ann@example.com>", "bob@example.com"],
        "cc": [{"email": "cc@example.com", "name": "Çelik, Ayşe"}],
        "bcc": ["hidden@example.com"],
        "reply_to": ["Support <support@example.com>"],
        "subject": SUBJECT,
        "text": "Hallo 👋",
        "html": "<p>Hallo 👋</p>",
        "headers": {"X-Campaign": "spring"},
        "tags": ["welcome", "onboarding"],
        "metadata": {"user_id": 42, "plan": "pro", "trial": True, "ref": None},
        "attachments": [{"filename": "Bericht-ä.pdf", "content_type": "application/pdf", "content": PDF}],
    }
    data.update(changes)
    return parse_email(data)


def assert_no_secret(secrets: tuple[str, ...], *objects: object) -> None:
    """No secret in the str/repr of the objects, nor of any exception they were raised from."""
    for obj in objects:
        seen: object | None = obj
        while seen is not None:
            for secret in secrets:
                assert secret not in str(seen), f"secret in str({type(seen).__name__})"
                assert secret not in repr(seen), f"secret in repr({type(seen).__name__})"
            seen = seen.__cause__ or seen.__context__ if isinstance(seen, BaseException) else None
