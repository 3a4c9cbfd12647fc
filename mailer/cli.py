"""``mailer``: the operations command line.

Exit codes, the same in ``mailer-consumer``: 0 ok; 1 a runtime or service error (MongoDB or
beanstalkd unreachable, a mail refused or not found); 2 a usage or configuration error (bad
arguments, an unusable configuration file, MAILER_* variable or MongoDB URI, production
without vendors); 130 interrupted. Every error is one line on stderr that says what to do;
tracebacks are for bugs only. The edge helpers (parser, durations, error mapping) are in
:mod:`mailer.cmdline`, shared with ``mailer-consumer`` and ``mailer-api``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError

from mailer.beanstalk import Beanstalk
from mailer.cmdline import (
    EXIT_FAILURE,
    EXIT_OK,
    CommandParser,
    UsageError,
    add_log_format,
    add_version,
    count,
    parse_args,
    parse_duration,
    run_guarded,
)
from mailer.config import DEFAULT_CONFIG_FILE, Settings, load_settings
from mailer.errors import MailerError, MailNotFound, NotFound
from mailer.events import DeliveryView, delivery_view, normalize_address
from mailer.fleet import Fleet
from mailer.logs import setup_logging
from mailer.models import MailRecord, Status, normalize_email
from mailer.producer import Producer
from mailer.requeue import sweep
from mailer.routing import THROTTLE_PREFIX
from mailer.store import MailStore
from mailer.vendors import vendor_names

# SimulatedVendor's message ids start so: how a record tells a simulated send from a real one.
_SIMULATED_ID = "sim-"


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


# --- subcommands ----------------------------------------------------------------------------


def _mail_from_args(args: argparse.Namespace) -> dict[str, Any] | bytes:
    if args.file is not None:
        # Bytes, not text: decoding is the JSON parser's job, so invalid UTF-8 is reported
        # like any other bad input (naming its field), whatever the locale's encoding.
        try:
            raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc}") from None
        return raw
    mail: dict[str, Any] = {}
    for key in ("from_", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "idempotency_key"):
        value = getattr(args, key)
        if value not in (None, []):
            mail["from" if key == "from_" else key] = value
    for key in ("priority", "delay"):
        if getattr(args, key) is not None:
            mail[key] = getattr(args, key)
    if args.tag:
        mail["tags"] = args.tag
    if args.header:
        headers: dict[str, str] = {}
        for item in args.header:
            name, sep, value = item.partition(":")
            if not sep:
                raise UsageError(f"--header {item!r}: use 'Name: value'")
            headers[name.strip()] = value.strip()
        mail["headers"] = headers
    if not mail:
        raise UsageError("give the mail as flags (--from, --to, --subject, --text ...) or with --file FILE|-")
    return mail


async def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    mail = _mail_from_args(args)
    async with Producer(settings) as producer:
        mail_id = await producer.send(mail)
    if args.json:
        _print_json({"id": mail_id})
    else:
        print(mail_id)
    return 0


def _simulated(record: MailRecord) -> bool:
    ids = [record.message_id, *(a.message_id for a in record.attempts)]
    return any(i is not None and i.startswith(_SIMULATED_ID) for i in ids)


def _format_record(record: MailRecord) -> str:
    e = record.email
    lines = [
        f"id:        {record.id}",
        f"status:    {record.status.value}",
        f"from:      {e.from_}",
        f"to:        {', '.join(str(a) for a in e.to)}",
        f"subject:   {e.subject}",
        f"created:   {record.created_at.isoformat()}",
        f"updated:   {record.updated_at.isoformat()}",
    ]
    if record.sent_at:
        how = "simulated, nothing left the machine; " if _simulated(record) else ""
        sent = f"{record.sent_at.isoformat()} via {record.vendor}"
        lines.append(f"sent:      {sent} ({how}message id {record.message_id})")
    if record.error:
        lines.append(f"error:     {record.error}")
    lines.append(f"rounds:    {record.rounds}")
    lines.append(f"attempts:  {len(record.attempts)}")
    for i, a in enumerate(record.attempts, 1):
        took = (a.finished_at - a.started_at).total_seconds() * 1000
        detail = a.message_id or a.error or ""
        lines.append(
            f"  {i}. {a.started_at.isoformat()} {a.vendor:<11} {a.outcome:<11} {took:7.1f} ms  {detail}"
        )
    return "\n".join(lines)


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    async with MailStore(settings) as store:
        record = await store.get(args.id)
        view = await delivery_view(store, record.id)
    if args.json:
        data = record.model_dump(mode="json", by_alias=True)
        data["simulated"] = _simulated(record)
        _print_json(data | view.model_dump(mode="json"))
    else:
        print("\n".join([_format_record(record), *_format_delivery(view)]))
    return 0


def _format_delivery(view: DeliveryView) -> list[str]:
    """What vendors reported after 'sent' (delivery events), and recipients dropped as suppressed."""
    lines = []
    if view.suppressed:
        lines.append(f"suppressed: {', '.join(view.suppressed)} (dropped at send: on the suppression list)")
    d = view.delivery
    if d is not None:
        facts = [f"delivered {d.delivered_at.isoformat()}" if d.delivered_at else "not reported delivered"]
        facts += [f"bounced ({d.bounce})"] * d.bounced + ["complained"] * d.complained
        lines.append(f"delivery:  {'; '.join(facts)}")
    lines.append(f"events:    {len(view.events)}")
    for i, e in enumerate(view.events, 1):
        kind = f"{e.type.value} ({e.bounce})" if e.bounce else e.type.value
        detail = f"{e.recipient or ''}  {e.reason or ''}"
        lines.append(f"  {i}. {e.at.isoformat()} {e.vendor:<11} {kind:<16} {detail}".rstrip())
    return lines


def _address(value: str) -> str:
    try:
        return normalize_address(normalize_email(value.strip()))
    except ValueError as exc:
        raise UsageError(f"{exc}; give e-mail addresses such as user@example.com") from None


async def cmd_suppress(settings: Settings, args: argparse.Namespace) -> int:
    """``mailer suppress add|remove|list``: the suppression list by hand."""
    addresses = [_address(a) for a in args.addresses]
    async with MailStore(settings) as store:
        if args.action == "list":
            found = await store.list_suppressions(after=args.after, limit=args.limit)
            rows = [
                {"address": d["_id"], "reason": d.get("reason"), "at": d["at"].isoformat()} for d in found
            ]
        elif args.action == "add":
            rows = [
                {"address": a, "added": await store.add_suppression(a, reason=args.reason, settle=False)}
                for a in addresses
            ]
        else:
            rows = [
                {"address": a, "removed": await store.remove_suppression(a, settle=False)} for a in addresses
            ]
        if args.action != "list":
            await store.settle_suppressions()  # once every sender's view has the change
    if args.json:
        _print_json(rows)
        return EXIT_OK
    for row in rows:
        if args.action == "list":
            print(f"{row['address']}  {row['reason']}  {row['at']}")
        elif args.action == "add":
            print(f"{row['address']}: {'suppressed' if row['added'] else 'already suppressed'}")
        else:
            print(f"{row['address']}: {'removed' if row['removed'] else 'was not on the list'}")
    return EXIT_OK if args.action != "remove" or all(r["removed"] for r in rows) else EXIT_FAILURE


async def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    async with Producer(settings) as producer:
        status = await producer.cancel(args.id)
    cancelled = status is Status.CANCELLED
    if args.json:
        _print_json({"id": args.id, "cancelled": cancelled, "status": status.value})
    elif cancelled:
        print(f"{args.id}: cancelled; its job is deleted unsent")
    else:
        print(f"mailer cancel: the mail is {status.value}: too late to cancel it", file=sys.stderr)
    return EXIT_OK if cancelled else EXIT_FAILURE


async def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    tube = settings.beanstalkd.tube
    async with MailStore(settings) as store, Fleet.from_settings(settings.beanstalkd) as queue:
        counts = await store.status_counts()
        try:  # summed over every server (one that does not answer is left out, and named)
            tube_stats = await queue.stats_tube(tube)
        except NotFound:
            tube_stats = {}
        down = [queue.name(i) for i, q in enumerate(queue.servers) if not q.connected]
    jobs = {
        k.removeprefix("current-jobs-"): int(v)
        for k, v in tube_stats.items()
        if k.startswith("current-jobs-") and isinstance(v, int)
    }
    data = {"tube": tube, "jobs": jobs, "collection": settings.mongodb.collection, "mails": counts}
    if down:
        data["unreachable"] = down
    if args.json:
        _print_json(data)
    else:
        print(
            f"tube {tube}: " + (", ".join(f"{k} {v}" for k, v in jobs.items()) or "no jobs (tube not in use)")
        )
        if down:
            print(f"not counted, unreachable: {', '.join(down)}")
        print(
            f"collection {settings.mongodb.collection}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        )
    return 0


async def cmd_requeue(settings: Settings, args: argparse.Namespace) -> int:
    async with MailStore(settings) as store, Fleet.from_settings(settings.beanstalkd) as queue:
        report = await sweep(settings, store, queue, older_than_s=args.older_than, dry_run=args.dry_run)
    if args.json:
        _print_json(
            {
                "dry_run": report.dry_run,
                "found": report.found,
                "requeued": report.requeued,
                "skipped": report.skipped,
                "threshold_s": report.threshold_s,
                "live": report.live,
                "in_flight": report.in_flight,
            }
        )
        return 0
    print(report.summary())
    if args.verbose:
        for mail_id in report.requeued:
            print(mail_id)
    return 0


async def cmd_kick(settings: Settings, args: argparse.Namespace) -> int:
    async with Fleet.from_settings(settings.beanstalkd) as queue:  # every server, up to --bound each
        await queue.use(settings.beanstalkd.tube)
        kicked = await queue.kick(args.bound)
    if args.json:
        _print_json({"tube": settings.beanstalkd.tube, "kicked": kicked})
    else:
        print(f"kicked {kicked} job(s) in tube {settings.beanstalkd.tube}")
    return 0


async def cmd_vendors(settings: Settings, args: argparse.Namespace) -> int:
    names = vendor_names(settings)  # production without vendors: the consumer's own error
    unknown = [n for n in args.reset if n not in names]
    if unknown:
        raise UsageError(f"--reset {unknown[0]}: not a vendor of this configuration ({', '.join(names)})")
    async with MailStore(settings) as store:
        for name in dict.fromkeys(args.reset):
            await store.clear_vendor(name)
            if not args.json:
                print(
                    f"{name}: mark cleared; running consumers use it again at their next refresh "
                    f"(within consumer.registry_refresh_s, {settings.consumer.registry_refresh_s:g} s)"
                )
        marks = await store.vendor_marks()
    now = time.time()
    rows: list[dict[str, Any]] = []
    for name in names:
        until, reason = marks.get(name, (0.0, ""))
        rows.append(
            {
                "vendor": name,
                "available": until <= now,
                "unavailable_until": until if until > now else None,
                "reason": reason if until > now else "",
                "mode": "real" if settings.production else "simulated",
            }
        )
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            if r["available"]:
                state = "available"
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r["unavailable_until"]))
                state = f"unavailable until {when} ({r['reason']})"
            print(f"{r['vendor']:<11} {r['mode']:<9} {state}")
    return 0


@dataclass(frozen=True, slots=True)
class Check:
    """One component's line of 'mailer check'."""

    component: str
    state: str  # ok, warn or FAIL
    detail: str


async def _check_beanstalkd(settings: Settings) -> list[Check]:
    """One line per server: a server down fails the check even though the producer fails
    over (it is one the operator has to bring back)."""
    b = settings.beanstalkd
    checks = []
    for host, port in b.addresses():
        where = f"{host}:{port}"
        try:
            async with Beanstalk(
                host, port, connect_timeout=b.connect_timeout_s, command_timeout=b.command_timeout_s
            ) as queue:
                tubes = await queue.list_tubes()
                stats = await queue.stats_tube(b.tube) if b.tube in tubes else {}
        except (MailerError, OSError) as exc:
            detail = f"{where} does not answer ({exc}); 'make services' starts it"
            checks.append(Check("beanstalkd", "FAIL", detail))
            continue
        jobs = ", ".join(
            f"{s} {stats.get(f'current-jobs-{s}', 0)}" for s in ("ready", "reserved", "delayed", "buried")
        )
        checks.append(Check("beanstalkd", "ok", f"{where}, tube {b.tube}: {jobs}"))
    return checks


def _check_vendors(settings: Settings, marks: dict[str, tuple[float, str]], now: float) -> list[Check]:
    names = vendor_names(settings)
    down = {n for n in names if marks.get(n, (0.0, ""))[0] > now}
    mode = "real" if settings.production else "simulated"
    lines = []
    for name in names:
        until, reason = marks.get(name, (0.0, ""))
        if name not in down:
            lines.append(Check(f"vendor {name}", "ok", f"{mode}, available"))
            continue
        state = "FAIL" if down == set(names) else "warn"
        kind = "throttled" if reason.startswith(THROTTLE_PREFIX) else "unavailable"
        lines.append(
            Check(f"vendor {name}", state, f"{mode}, {kind} for {until - now:.0f} s more ({reason})")
        )
    return lines


def _check_consumers(settings: Settings, live: list[dict[str, Any]], now: float) -> Check:
    tube = settings.beanstalkd.tube
    if not live:
        window = 3 * settings.consumer.heartbeat_s
        return Check("consumers", "FAIL", f"none of tube {tube} seen in the last {window:.0f} s")
    seen = ", ".join(f"{d['_id']} ({now - float(d['seen']):.0f} s ago)" for d in live)
    return Check("consumers", "ok", f"{len(live)} live on tube {tube}: {seen}")


async def _check_store(settings: Settings) -> list[Check]:
    m = settings.mongodb
    now = time.time()
    try:
        async with MailStore(settings) as store:
            took = await store.ping()
            marks = await store.vendor_marks()
            since = now - 3 * settings.consumer.heartbeat_s
            live = await store.live_consumers(settings.beanstalkd.tube, seen_since=since)
    except (MailerError, PyMongoError) as exc:
        # The type only: a driver message may quote the URI, which may hold a password.
        reason = type(exc).__name__
        return [
            Check("mongodb", "FAIL", f"does not answer ({reason}); check mongodb.uri and the server"),
            Check("vendors", "FAIL", "marks unknown: MongoDB does not answer"),
            Check("consumers", "FAIL", "heartbeats unknown: MongoDB does not answer"),
        ]
    ok = Check("mongodb", "ok", f"collection {m.collection}, ping {took * 1000:.1f} ms")
    return [ok, *_check_vendors(settings, marks, now), _check_consumers(settings, live, now)]


async def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    checks = [*await _check_beanstalkd(settings), *await _check_store(settings)]
    healthy = all(c.state != "FAIL" for c in checks)
    if args.json:
        _print_json({"ok": healthy, "checks": [asdict(c) for c in checks]})
    else:
        width = max(len(c.component) for c in checks)
        for c in checks:
            print(f"{c.component:<{width}}  {c.state:<4}  {c.detail}")
    return EXIT_OK if healthy else EXIT_FAILURE


# --- parser ---------------------------------------------------------------------------------


async def cmd_outbox(settings: Settings, args: argparse.Namespace) -> int:
    """The raw bytes on stdout, untouched: ``mailer outbox ID > mail.eml`` opens in any mail reader."""
    async with MailStore(settings) as store:
        kept = await store.outbox_raw(args.id)
    if kept is None:
        raise MailNotFound(
            f"the outbox keeps no message of mail {args.id!r}: it is kept only for a simulated send "
            f"that happened, with [simulation] keep_raw on, among the newest keep_raw_max "
            f"({settings.simulation.keep_raw_max}); 'mailer status ID' shows how it went"
        )
    sys.stdout.buffer.write(kept.raw)
    sys.stdout.buffer.flush()
    return 0


def _add_outbox(sub: Any, common: argparse.ArgumentParser) -> None:
    o = sub.add_parser(
        "outbox",
        parents=[common],
        help="the MIME message a simulated send would have sent",
        description="Print the whole MIME message of a simulated send, exactly as the SMTP vendor "
        "would have sent it (the development outbox): 'mailer outbox ID > mail.eml'. Exit 1 if none "
        "is kept.",
    )
    o.add_argument("id", help="the mail id printed by 'mailer send' (24 hex characters)")
    o.set_defaults(func=cmd_outbox)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"configuration file (default: $MAILER_CONFIG, else ./{DEFAULT_CONFIG_FILE} if present)",
    )
    common.add_argument("--test", action="store_true", help="use the [test] tube and collections")
    common.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) on stderr")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    add_log_format(common)
    return common


def _add_send(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "send",
        parents=[common],
        help="send one mail; prints its id",
        description="Store one mail in MongoDB and queue its id; prints the id (24 hex characters).",
    )
    s.add_argument("--file", metavar="FILE", help="the mail as a JSON document ('-' reads stdin)")
    s.add_argument("--from", dest="from_", metavar="ADDRESS", help="sender, e.g. 'Shop <shop@example.com>'")
    s.add_argument("--to", action="append", default=[], metavar="ADDRESS", help="recipient (repeatable)")
    s.add_argument("--cc", action="append", default=[], metavar="ADDRESS", help="copy recipient (repeatable)")
    s.add_argument("--bcc", action="append", default=[], metavar="ADDRESS", help="blind copy (repeatable)")
    s.add_argument(
        "--reply-to", dest="reply_to", action="append", default=[], metavar="ADDRESS", help="reply address"
    )
    s.add_argument("--subject", help="the subject line")
    s.add_argument("--text", help="the plain-text body")
    s.add_argument("--html", help="the HTML body")
    s.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="extra header")
    s.add_argument("--tag", action="append", default=[], help="a tag for the vendors (repeatable)")
    s.add_argument("--priority", type=count(0), help="beanstalkd priority, 0 most urgent (default: config)")
    s.add_argument(
        "--delay", type=parse_duration, metavar="DURATION", help="wait before sending: 90, 30s, 5m, 2h"
    )
    s.add_argument("--idempotency-key", dest="idempotency_key", help="a key already used sends nothing new")
    s.set_defaults(func=cmd_send)


def _add_operations(sub: Any, common: argparse.ArgumentParser) -> None:
    st = sub.add_parser(
        "status",
        parents=[common],
        help="a mail's record and attempts",
        description="Show a stored mail's status, its vendor and every attempt (exit 1 if unknown).",
    )
    st.add_argument("id", help="the mail id printed by 'mailer send' (24 hex characters)")
    st.set_defaults(func=cmd_status)

    ca = sub.add_parser(
        "cancel",
        parents=[common],
        help="cancel a mail not yet sent",
        description="Cancel a mail that is still queued or retrying: it is never sent (the consumer "
        "deletes its job unsent). Exit 1 if it is unknown, or already being sent or finished.",
    )
    ca.add_argument("id", help="the mail id printed by 'mailer send' (24 hex characters)")
    ca.set_defaults(func=cmd_cancel)

    sa = sub.add_parser(
        "stats",
        parents=[common],
        help="tube counts and mail status counts",
        description="Jobs of the tube by state (beanstalkd) and mails by status (MongoDB).",
    )
    sa.set_defaults(func=cmd_stats)

    rq = sub.add_parser(
        "requeue",
        parents=[common],
        help="queue again the mails no live job can deliver",
        description="Find mails left queued or retrying with no job to deliver them (e.g. beanstalkd "
        "lost its binlog) and put their ids back on the tube. The consumers run this sweep too.",
    )
    rq.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        default=None,
        help="only mails untouched this long: 90, 30s, 10m, 2h (default: consumer.requeue_older_than_s)",
    )
    rq.add_argument("--dry-run", action="store_true", help="list what would be requeued, change nothing")
    rq.set_defaults(func=cmd_requeue)

    k = sub.add_parser(
        "kick",
        parents=[common],
        help="move buried jobs back to ready",
        description="Kick buried jobs of the tube back to ready, so consumers try them again.",
    )
    k.add_argument("--bound", type=count(1), default=1_000_000, help="at most this many jobs (default: all)")
    k.set_defaults(func=cmd_kick)

    v = sub.add_parser(
        "vendors",
        parents=[common],
        help="each vendor's availability; --reset clears a mark",
        description="Each vendor in round-robin order, real or simulated, and whether a failure "
        "marked it unavailable. --reset NAME clears the mark at once (e.g. after fixing its API "
        "key); running consumers adopt it at their next refresh.",
    )
    v.add_argument(
        "--reset", action="append", default=[], metavar="NAME", help="make NAME available again (repeatable)"
    )
    v.set_defaults(func=cmd_vendors)

    ch = sub.add_parser(
        "check",
        parents=[common],
        help="one line per component; exit 0 if all is well, else 1",
        description="Check beanstalkd, MongoDB, each vendor's mark and the live consumers of the "
        "tube (by their heartbeats, seen within 3 consumer.heartbeat_s). One line each, 'ok' or "
        "'FAIL' (a marked vendor while another is available: 'warn'); exit 1 on any FAIL, for "
        "scripts and probes.",
    )
    ch.set_defaults(func=cmd_check)


def _add_suppress(sub: Any, common: argparse.ArgumentParser) -> None:
    sp = sub.add_parser(
        "suppress",
        help="the suppression list: add, remove or list addresses",
        description="Addresses on the suppression list get no mail: a send to one is refused, or the "
        "address dropped ([suppression] mode). Hard bounces and complaints reported by the vendors' "
        "webhooks add them by themselves.",
    )
    actions = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[common], help="suppress addresses")
    add.add_argument("addresses", nargs="+", metavar="ADDRESS")
    add.add_argument("--reason", default="manual", help="recorded with the entry (default: manual)")
    remove = actions.add_parser(
        "remove", parents=[common], help="allow addresses again (exit 1 if one was not listed)"
    )
    remove.add_argument("addresses", nargs="+", metavar="ADDRESS")
    listing = actions.add_parser("list", parents=[common], help="the entries in address order")
    listing.add_argument("--after", default="", metavar="ADDRESS", help="start after this address")
    listing.add_argument("--limit", type=count(1), default=100, help="at most this many (default: 100)")
    listing.set_defaults(addresses=[])
    sp.set_defaults(func=cmd_suppress)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="mailer",
        description="Operate the mailer service: send a mail, inspect mails, queues and vendors, "
        "requeue orphans. 'mailer COMMAND --help' describes each command.",
    )
    add_version(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()
    _add_send(sub, common)
    _add_operations(sub, common)
    _add_outbox(sub, common)
    _add_suppress(sub, common)
    return p


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, test=args.test)
    if args.command == "requeue" and args.older_than is None:
        args.older_than = settings.consumer.requeue_older_than_s
    func: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = args.func
    return asyncio.run(func(settings, args))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    setup_logging(logging.INFO if args.verbose else logging.WARNING, fmt=args.log_format)
    return run_guarded(f"mailer {args.command}", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
