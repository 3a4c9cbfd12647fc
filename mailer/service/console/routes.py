"""The console's pages and actions, server-rendered (Jinja2): every read view works without
JavaScript; ``static/console.js`` only refreshes the ``data-live`` parts every 2 s and copies ids.

Every page answers with a strict Content-Security-Policy (scripts from this origin only, no
inline script, never framed). A mail's HTML is served by its own route into an iframe with
``sandbox=""`` under ``default-src 'none'``: no script runs, no form posts, no link navigates
the console, and remote images load only when the user asks (a second CSP, not a rewrite of
the mail). Every action is a POST carrying the session's CSRF token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bson import ObjectId
from bson.errors import InvalidId
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.errors import BeanstalkError, MailNotFound, NotFound
from mailer.fleet import Fleet, fleet_job_id, split_job_id
from mailer.models import MailRecord, Status
from mailer.producer import Producer
from mailer.routing import THROTTLE_PREFIX
from mailer.service.auth import KeyRing, is_loopback
from mailer.service.console.counts import SharedCounts
from mailer.service.console.session import COOKIE, Session, Sessions
from mailer.store import Cursor, Doc, MailFilter, MailStore, OutboxEntry, parse_mail_id
from mailer.vendors import vendor_names

PAGE_SIZE = 50
MAX_FORM_BYTES = 16 * 1024
RAW_SHOWN_BYTES = 256 * 1024
SIMULATED_ID = "sim-"  # SimulatedVendor's message ids start so
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# The mail's own HTML: nothing but inline styles and data: images; framed by the console only.
HTML_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'; sandbox"
HTML_CSP_IMAGES = HTML_CSP.replace("img-src data:", "img-src data: https: http:")
STATUSES = [s.value for s in Status]
FILTER_KEYS = ("status", "vendor", "rcpt", "tag", "since", "until")
NOTICES = {
    "cancelled": "Cancelled: its job is deleted unsent.",
    "too-late": "Too late: the mail is no longer queued or retrying.",
    "retried": "Queued again: a consumer takes it now.",
    "kicked-retry": "Its delayed job is ready now: a consumer takes it at once.",
    "not-retryable": "Nothing to retry: only failed or retrying mails can be retried.",
    "stored-not-queued": "Queued in MongoDB, but beanstalkd did not take the job: the sweep queues it.",
    "reset": "Mark cleared: running consumers use the vendor again at their next refresh.",
    "kicked": "Buried jobs kicked back to ready.",
    "nothing-buried": "No buried job to kick.",
    "signed-out": "Signed out.",
}

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
console = APIRouter(include_in_schema=False)


# --- who is visiting ----------------------------------------------------------------------


class Refused(Exception):
    """A visit the console will not serve (shown as a page, not the API's JSON)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Visit:
    request: Request
    session: Session
    fresh: bool  # the cookie must be (re)set on the answer

    @property
    def sessions(self) -> Sessions:
        sessions: Sessions = self.request.app.state.console_sessions
        return sessions

    @property
    def csrf(self) -> str:
        return self.sessions.csrf(self.session)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _producer(request: Request) -> Producer:
    producer: Producer = request.app.state.producer
    return producer


def _store(request: Request) -> MailStore:
    return _producer(request).store


def visit_of(request: Request) -> Visit:
    """The visitor's session, a new one when there is none. Without [api] keys the console,
    like the API, serves this machine only, and every local visitor is signed in."""
    ring: KeyRing = request.app.state.keys
    sessions: Sessions = request.app.state.console_sessions
    local = is_loopback(request.client.host if request.client is not None else None)
    if ring.open and not local:
        raise Refused(
            403, "No [api] keys are configured, so the console serves this machine (loopback) only."
        )
    session = sessions.read(request.cookies.get(COOKIE))
    if session is None or (ring.open and not session.authed):
        return Visit(request, sessions.new(authed=ring.open), fresh=True)
    return Visit(request, session, fresh=False)


def _secure(response: Response, visit: Visit | None, *, csp: str = PAGE_CSP) -> Response:
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"
    if csp == PAGE_CSP:
        response.headers["X-Frame-Options"] = "DENY"
    if visit is not None and visit.fresh:
        response.set_cookie(
            COOKIE,
            visit.sessions.cookie(visit.session),
            max_age=int(visit.sessions.max_age_s),
            httponly=True,
            samesite="strict",
            secure=visit.request.url.scheme == "https",
            path="/",
        )
    return response


def page(visit: Visit, name: str, context: Mapping[str, Any], *, status: int = 200) -> Response:
    settings = _settings(visit.request)
    ctx = {
        "csrf": visit.csrf,
        "authed": visit.session.authed,
        "open_mode": visit.request.app.state.keys.open,
        "simulated_mode": not settings.production,
        "notice": NOTICES.get(visit.request.query_params.get("done", "")),
        "now": time.time(),
        **context,
    }
    response = templates.TemplateResponse(visit.request, name, ctx, status_code=status)
    return _secure(response, visit)


def refused_page(request: Request, exc: Refused) -> Response:
    response = templates.TemplateResponse(
        request, "refused.html", {"message": exc.message, "authed": False, "csrf": ""}, status_code=exc.status
    )
    return _secure(response, None)


def redirect(visit: Visit | None, to: str) -> Response:
    return _secure(RedirectResponse(to, status_code=303), visit)


def _login_redirect(visit: Visit) -> Response:
    target = visit.request.url.path
    if visit.request.url.query:
        target += "?" + visit.request.url.query
    return redirect(visit, "/login?" + urllib.parse.urlencode({"next": target}))


def _local_path(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (never ``//host`` or a URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def form_of(request: Request) -> dict[str, str]:
    """The urlencoded body of a form POST (no multipart parser needed: forms carry no files)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Refused(413, "The form is too large.")
    pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return dict(pairs)


async def checked_post(request: Request, *, need_auth: bool = True) -> tuple[Visit, dict[str, str]]:
    """A POST's visit and form, once its CSRF token is the session's own."""
    visit = visit_of(request)
    form = await form_of(request)
    if visit.fresh or not visit.sessions.csrf_ok(visit.session, form.get("csrf")):
        raise Refused(
            403, "The form's CSRF token is missing or stale: reload the page and submit the form again."
        )
    if need_auth and not visit.session.authed:
        raise Refused(401, "Sign in first: your session has ended.")
    if need_auth:  # an action (cancel, retry, kick...): the next page counts afresh
        shared: SharedCounts = request.app.state.console_counts
        shared.drop()
    return visit, form


# --- sign in and out ---------------------------------------------------------------------


@console.get("/login")
async def login_form(request: Request) -> Response:
    visit = visit_of(request)
    if visit.session.authed:
        return redirect(visit, _local_path(request.query_params.get("next")))
    return page(visit, "login.html", {"next": _local_path(request.query_params.get("next")), "error": None})


@console.post("/login")
async def login(request: Request) -> Response:
    visit, form = await checked_post(request, need_auth=False)
    ring: KeyRing = request.app.state.keys
    target = _local_path(form.get("next"))
    if not ring.accepts(form.get("key", "")):
        context = {"next": target, "error": "That key is not one of [api] keys (keys are compared whole)."}
        return page(visit, "login.html", context, status=401)
    signed_in = Visit(request, visit.sessions.new(authed=True), fresh=True)
    return redirect(signed_in, target)


@console.post("/logout")
async def logout(request: Request) -> Response:
    visit, _ = await checked_post(request, need_auth=False)
    signed_out = Visit(request, visit.sessions.new(authed=False), fresh=True)
    return redirect(signed_out, "/login?done=signed-out")


# --- the mails list ------------------------------------------------------------------------


def _epoch(value: str | None) -> float | None:
    """A ``datetime-local`` field (taken as UTC) as epoch seconds."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise Refused(400, f"Not a date and time: {value[:40]!r}; use YYYY-MM-DDTHH:MM (UTC).") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def filter_of(query: Mapping[str, str]) -> MailFilter:
    status = query.get("status") or None
    if status is not None and status not in STATUSES:
        raise Refused(400, f"Unknown status {status[:30]!r}; choose one of {', '.join(STATUSES)}.")
    recipient = (query.get("rcpt") or "").strip() or None
    prefix = recipient is not None and recipient.endswith("*")
    return MailFilter(
        status=status,
        vendor=query.get("vendor") or None,
        recipient=recipient.rstrip("*") or None if recipient else None,
        prefix=prefix,
        tag=query.get("tag") or None,
        since_ts=_epoch(query.get("since")),
        until_ts=_epoch(query.get("until")),
    )


def cursor_of(value: str | None) -> Cursor | None:
    """``after=<queued_ts>_<id>_<shown>`` as written by :func:`cursor_text`."""
    if not value:
        return None
    parts = value.split("_")
    try:
        ts, oid, shown = parts
        return float(ts), ObjectId(oid), int(shown)
    except (ValueError, InvalidId, TypeError):
        raise Refused(400, "That page link is damaged: start again from the newest mails.") from None


def cursor_text(cursor: Cursor) -> str:
    ts, oid, shown = cursor
    return f"{ts!r}_{oid}_{shown}"


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _row(doc: Doc) -> dict[str, Any]:
    mail = doc.get("mail") or {}
    to = [str(a.get("email", "")) for a in mail.get("to") or [] if isinstance(a, dict)]
    sender = mail.get("from_") or mail.get("from") or {}  # stored by field name (from_)
    return {
        "id": str(doc["_id"]),
        "when": _when(doc.get("queued_ts")),
        "status": str(doc.get("status", "")),
        "from": str(sender.get("email", "")) if isinstance(sender, dict) else "",
        "to": to[0] if to else "",
        "more_to": max(0, len(to) - 1),
        "subject": str(mail.get("subject", "")),
        "vendor": doc.get("vendor") or "",
        "tags": [str(t) for t in mail.get("tags") or []],
        "simulated": str(doc.get("message_id") or "").startswith(SIMULATED_ID),
        "error": str(doc.get("error") or "")[:200],
    }


@console.get("/")
async def mails(request: Request) -> Response:
    visit = visit_of(request)
    if not visit.session.authed:
        return _login_redirect(visit)
    query = request.query_params
    filters = filter_of(query)
    after = cursor_of(query.get("after"))
    store = _store(request)
    shared: SharedCounts = request.app.state.console_counts
    docs, counts = await asyncio.gather(
        store.console_page(filters, after=after, limit=PAGE_SIZE + 1), shared.get(store.status_counts)
    )
    following = docs[PAGE_SIZE] if len(docs) > PAGE_SIZE else None
    docs = docs[:PAGE_SIZE]
    cursor = MailStore.next_cursor(docs, after, following)
    keep = {
        k: v for k, v in query.items() if k in ("status", "vendor", "rcpt", "tag", "since", "until") and v
    }
    older = urllib.parse.urlencode({**keep, "after": cursor_text(cursor)}) if following and cursor else None
    context = {
        "rows": [_row(d) for d in docs],
        "counts": counts,
        "total": sum(counts.values()),
        "query": keep,
        "statuses": STATUSES,
        "vendors": vendor_names(_settings(request)),
        "older": older,
        "newest": urllib.parse.urlencode(keep),
        "all_link": urllib.parse.urlencode({k: v for k, v in keep.items() if k != "status"}),
        "first_page": after is None,
        "status_links": {s: urllib.parse.urlencode({**keep, "status": s}) for s in STATUSES},
    }
    return page(visit, "mails.html", context)


# --- one mail ---------------------------------------------------------------------------------


async def _record(request: Request, mail_id: str) -> MailRecord:
    if parse_mail_id(mail_id) is None:
        raise Refused(400, "Not a mail id: give the 24 hex characters returned when it was sent.")
    try:
        return await _store(request).get(mail_id)
    except MailNotFound:
        raise Refused(404, f"No mail {mail_id} in this collection.") from None


def _attempts(record: MailRecord) -> list[dict[str, Any]]:
    return [
        {
            "vendor": a.vendor,
            "outcome": a.outcome,
            "error": a.error or "",
            "message_id": a.message_id or "",
            "started": a.started_at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            "ms": f"{(a.finished_at - a.started_at).total_seconds() * 1000:.1f}",
        }
        for a in record.attempts
    ]


def _is_simulated(record: MailRecord, kept: OutboxEntry | None) -> bool:
    ids = [record.message_id, *(a.message_id for a in record.attempts)]
    return kept is not None or any(i is not None and i.startswith(SIMULATED_ID) for i in ids)


@console.get("/mails/{mail_id}")
async def mail(request: Request, mail_id: str) -> Response:
    visit = visit_of(request)
    if not visit.session.authed:
        return _login_redirect(visit)
    record = await _record(request, mail_id)
    kept = await _store(request).outbox_raw(mail_id)
    raw_text = None
    if kept is not None:
        raw_text = kept.raw[:RAW_SHOWN_BYTES].decode("utf-8", "replace")
    e = record.email
    context = {
        "r": record,
        "e": e,
        "attempts": _attempts(record),
        "simulated": _is_simulated(record, kept),
        "raw_text": raw_text,
        "raw_cut": kept is not None and len(kept.raw) > RAW_SHOWN_BYTES,
        "images": request.query_params.get("images") == "1",
        "can_cancel": record.status in (Status.QUEUED, Status.RETRYING),
        "can_retry": record.status in (Status.FAILED, Status.RETRYING),
        "created": record.created_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "sent": record.sent_at.strftime("%Y-%m-%d %H:%M:%S UTC") if record.sent_at else None,
    }
    return page(visit, "mail.html", context)


@console.get("/mails/{mail_id}/html")
async def mail_html(request: Request, mail_id: str) -> Response:
    """The mail's HTML alone, for the sandboxed iframe: its own CSP, which (with ``sandbox``)
    also holds when the URL is opened directly in a tab."""
    visit = visit_of(request)
    if not visit.session.authed:
        raise Refused(401, "Sign in first.")
    record = await _record(request, mail_id)
    csp = HTML_CSP_IMAGES if request.query_params.get("images") == "1" else HTML_CSP
    response = HTMLResponse(record.email.html or "")
    return _secure(response, None, csp=csp)


@console.get("/mails/{mail_id}/attachments/{index}")
async def attachment(request: Request, mail_id: str, index: int) -> Response:
    visit = visit_of(request)
    if not visit.session.authed:
        raise Refused(401, "Sign in first.")
    record = await _record(request, mail_id)
    if not 0 <= index < len(record.email.attachments):
        raise Refused(404, f"Mail {mail_id} has no attachment {index}.")
    att = record.email.attachments[index]
    name = urllib.parse.quote(att.filename)
    response = Response(
        att.content,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f"attachment; filename*=UTF-8''{name}"},
    )
    return _secure(response, None, csp="default-src 'none'; sandbox")


@console.get("/mails/{mail_id}/raw")
async def raw(request: Request, mail_id: str) -> Response:
    visit = visit_of(request)
    if not visit.session.authed:
        raise Refused(401, "Sign in first.")
    kept = await _store(request).outbox_raw(mail_id)
    if kept is None:
        raise Refused(404, f"The outbox keeps no message of mail {mail_id} (only simulated sends are kept).")
    response = Response(
        kept.raw,
        media_type="message/rfc822",
        headers={"Content-Disposition": f'attachment; filename="mail-{mail_id}.eml"'},
    )
    return _secure(response, None, csp="default-src 'none'; sandbox")


@console.post("/mails/{mail_id}/cancel")
async def cancel(request: Request, mail_id: str) -> Response:
    visit, _ = await checked_post(request)
    await _record(request, mail_id)
    status = await _producer(request).cancel(mail_id)
    done = "cancelled" if status is Status.CANCELLED else "too-late"
    return redirect(visit, f"/mails/{mail_id}?done={done}")


@contextlib.asynccontextmanager
async def _fleet(settings: Settings) -> AsyncIterator[Fleet]:
    """Every configured beanstalkd server (stored job ids name their server: :mod:`mailer.fleet`);
    none answering is a page that says so, not the API's JSON."""
    try:
        async with Fleet.from_settings(settings.beanstalkd) as fleet:
            yield fleet
    except BeanstalkError as exc:
        raise Refused(
            503,
            f"beanstalkd does not answer ({type(exc).__name__}); nothing was changed. Check that it "
            "runs ('make services' starts the local one) and reload.",
        ) from None


def _server_of(fleet: Fleet, job_id: int) -> tuple[Beanstalk, int] | None:
    """The server holding a stored job id, and that server's own id of the job."""
    server, local = split_job_id(job_id)
    return (fleet.servers[server], local) if server < len(fleet) else None


async def _job_state(fleet: Fleet, job_id: int) -> tuple[str, str]:
    """(state, tube) of a stored job id; empty when it is gone or its server is away."""
    found = _server_of(fleet, job_id)
    if found is None:
        return "", ""
    queue, local = found
    try:
        stats = await queue.stats_job(local)
    except BeanstalkError:
        return "", ""
    return str(stats.get("state", "")), str(stats.get("tube", ""))


async def _retry(request: Request, record: MailRecord) -> str:
    """A retrying mail's delayed job is kicked to ready; a failed mail is queued again
    (compare-and-set) with a new job. Without beanstalkd it stays queued for the sweep."""
    settings, store = _settings(request), _store(request)
    b = settings.beanstalkd
    async with _fleet(settings) as fleet:
        if record.status is Status.RETRYING and record.job_id is not None:
            found = _server_of(fleet, record.job_id)
            if found is not None and (await _job_state(fleet, record.job_id))[0] == "delayed":
                await found[0].kick_job(found[1])
                return "kicked-retry"
            # its job is gone: queue a new one below
        elif record.status is Status.FAILED:
            if await store.retry_failed(ObjectId(record.id)) is None:
                return "not-retryable"
        else:
            return "not-retryable"
        try:
            await fleet.use(b.tube)
            job_id = await fleet.put(record.id, priority=_priority(record, settings), ttr=b.ttr_s)
        except BeanstalkError:
            return "stored-not-queued"
    await store.record_job_ids({record.id: job_id})
    return "retried"


def _priority(record: MailRecord, settings: Settings) -> int:
    priority = record.email.priority
    return settings.producer.default_priority if priority is None else priority


@console.post("/mails/{mail_id}/retry")
async def retry(request: Request, mail_id: str) -> Response:
    visit, _ = await checked_post(request)
    record = await _record(request, mail_id)
    done = await _retry(request, record)
    return redirect(visit, f"/mails/{mail_id}?done={done}")


# --- vendors ---------------------------------------------------------------------------------


def vendor_state(until: float, reason: str, now: float) -> tuple[str, str]:
    """(state, detail) as routing sees a mark: throttled and unavailable until their time, and
    an outage's mark that ran out is half-open until a probe succeeds (which clears it)."""
    throttled = reason.startswith(THROTTLE_PREFIX)
    if until > now:
        return ("throttled" if throttled else "unavailable"), f"until {_when(until)} UTC"
    if until > 0 and reason and not throttled:
        return "half-open", "cooldown over: the next send is a probe"
    return "available", ""


@console.get("/vendors")
async def vendors(request: Request) -> Response:
    visit = visit_of(request)
    if not visit.session.authed:
        return _login_redirect(visit)
    settings = _settings(request)
    marks = await _store(request).vendor_marks()
    limits = settings.rate_limits()
    now = time.time()
    rows = []
    for name in vendor_names(settings):
        until, reason = marks.get(name, (0.0, ""))
        state, detail = vendor_state(until, reason, now)
        rows.append(
            {
                "name": name,
                "state": state,
                "detail": detail,
                "reason": reason.removeprefix(THROTTLE_PREFIX) if state != "available" else "",
                "limit": limits.get(name),
                "marked": name in marks and state != "available",
            }
        )
    return page(visit, "vendors.html", {"rows": rows, "refresh_s": settings.consumer.registry_refresh_s})


@console.post("/vendors/{name}/reset")
async def vendor_reset(request: Request, name: str) -> Response:
    visit, _ = await checked_post(request)
    if name not in vendor_names(_settings(request)):
        raise Refused(404, f"{name[:40]!r} is not a vendor of this configuration.")
    await _store(request).clear_vendor(name)
    return redirect(visit, "/vendors?done=reset")


# --- the queue ----------------------------------------------------------------------------------

QUEUE_STATES = ("ready", "reserved", "delayed", "buried")
BURIED_SHOWN = 50


async def _tube_counts(fleet: Fleet, tube: str) -> dict[str, int]:
    try:
        stats = await fleet.stats_tube(tube)
    except NotFound:  # beanstalkd forgets a tube without jobs or watchers
        return dict.fromkeys(QUEUE_STATES, 0)
    return {k: int(stats.get(f"current-jobs-{k}", 0)) for k in QUEUE_STATES}


async def _buried_of(fleet: Fleet, tube: str, docs: list[Doc]) -> list[dict[str, Any]]:
    """The failed mails whose jobs are buried in ``tube`` (asked together: the client pipelines)."""
    with_jobs = [d for d in docs if isinstance(d.get("job_id"), int)]
    states = await asyncio.gather(*(_job_state(fleet, int(d["job_id"])) for d in with_jobs))
    return [
        {**_row(d), "job_id": int(d["job_id"])}
        for d, (s, t) in zip(with_jobs, states, strict=True)
        if s == "buried" and t == tube
    ]


async def _first_buried(fleet: Fleet) -> list[dict[str, Any]]:
    """Each server's first buried job of the used tube: all that beanstalkd shows of jobs no
    mail points at (a body that is not a mail id, a mail since deleted)."""
    out = []
    for server in await fleet.reachable():
        job = await fleet.servers[server].peek_buried()
        if job is not None:
            body = job.body[:80].decode("utf-8", "replace")
            mail_id = body if parse_mail_id(body) else None
            out.append({"job_id": fleet_job_id(server, job.id), "body": body, "mail_id": mail_id})
    return out


@console.get("/queue")
async def queue_page(request: Request) -> Response:
    visit = visit_of(request)
    if not visit.session.authed:
        return _login_redirect(visit)
    settings = _settings(request)
    tube = settings.beanstalkd.tube
    failed = await _store(request).failed_mails(BURIED_SHOWN)
    async with _fleet(settings) as fleet:
        await fleet.use(tube)
        counts = await _tube_counts(fleet, tube)
        buried = await _buried_of(fleet, tube, failed)
        shown = {b["job_id"] for b in buried}
        firsts = [f for f in await _first_buried(fleet) if f["job_id"] not in shown]
    context = {"tube": tube, "counts": counts, "buried": buried, "firsts": firsts}
    return page(visit, "queue.html", context)


async def _kick_one(fleet: Fleet, tube: str, job_id: int) -> bool:
    found = _server_of(fleet, job_id)
    if found is None or await _job_state(fleet, job_id) != ("buried", tube):
        return False
    await found[0].kick_job(found[1])
    return True


async def _kick_buried(fleet: Fleet, tube: str) -> int:
    """Kick each server's buried jobs of ``tube`` only: beanstalkd's ``kick`` moves delayed jobs
    (mails waiting out their back-off) when none is buried, so each bound is that server's
    buried count."""
    kicked = 0
    for server in await fleet.reachable():
        queue = fleet.servers[server]
        try:
            buried = int((await queue.stats_tube(tube)).get("current-jobs-buried", 0))
        except NotFound:
            continue
        if buried:
            kicked += await queue.kick(buried)
    return kicked


@console.post("/queue/kick")
async def kick(request: Request) -> Response:
    visit, form = await checked_post(request)
    settings = _settings(request)
    tube = settings.beanstalkd.tube
    job = form.get("job", "")
    async with _fleet(settings) as fleet:
        await fleet.use(tube)
        kicked = (
            await _kick_one(fleet, tube, int(job)) if job.isdigit() else await _kick_buried(fleet, tube) > 0
        )
    return redirect(visit, "/queue?done=" + ("kicked" if kicked else "nothing-buried"))
