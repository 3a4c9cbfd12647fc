"""``mailer``: the operations command line.

Exit codes: 0 ok, 1 failure, 2 usage (argparse's own convention). Every error is one line
on stderr that says what to do; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from pymongo.errors import PyMongoError

from mailer.beanstalk import Beanstalk
from mailer.config import Settings, load_settings
from mailer.errors import EmailValidationError, MailerError
from mailer.models import MailRecord
from mailer.producer import Producer
from mailer.requeue import sweep
from mailer.store import MailStore

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """Bad arguments: exit 2."""


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` -> seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 30s, 10m, 2h")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _queue(settings: Settings) -> Beanstalk:
    b = settings.beanstalkd
    return Beanstalk(b.host, b.port, connect_timeout=b.connect_timeout_s, command_timeout=b.command_timeout_s)


# --- subcommands ----------------------------------------------------------------------------


def _mail_from_args(args: argparse.Namespace) -> dict[str, Any] | bytes:
    if args.json is not None:
        # Bytes, not text: decoding is the JSON parser's job, so invalid UTF-8 is reported
        # like any other bad input (naming its field), whatever the locale's encoding.
        try:
            raw = sys.stdin.buffer.read() if args.json == "-" else Path(args.json).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {args.json}: {exc}") from None
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
        raise UsageError("give the mail as flags (--from, --to, --subject, --text ...) or with --json FILE|-")
    return mail


async def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    mail = _mail_from_args(args)
    async with Producer(settings) as producer:
        mail_id = await producer.send(mail)
    print(mail_id)
    return 0


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
        lines.append(
            f"sent:      {record.sent_at.isoformat()} via {record.vendor} (message id {record.message_id})"
        )
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
    if args.json:
        print(record.model_dump_json(indent=2, by_alias=True))
    else:
        print(_format_record(record))
    return 0


async def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    tube = settings.beanstalkd.tube
    async with MailStore(settings) as store, _queue(settings) as queue:
        counts = await store.status_counts()
        names = await queue.list_tubes()
        tube_stats = await queue.stats_tube(tube) if tube in names else {}
    jobs = {
        k.removeprefix("current-jobs-"): int(v)
        for k, v in tube_stats.items()
        if k.startswith("current-jobs-") and isinstance(v, int)
    }
    data = {"tube": tube, "jobs": jobs, "collection": settings.mongodb.collection, "mails": counts}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(
            f"tube {tube}: " + (", ".join(f"{k} {v}" for k, v in jobs.items()) or "no jobs (tube not in use)")
        )
        print(
            f"collection {settings.mongodb.collection}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        )
    return 0


async def cmd_requeue(settings: Settings, args: argparse.Namespace) -> int:
    async with MailStore(settings) as store, _queue(settings) as queue:
        report = await sweep(settings, store, queue, older_than_s=args.older_than, dry_run=args.dry_run)
    print(report.summary())
    if args.verbose:
        for mail_id in report.requeued:
            print(mail_id)
    return 0


async def cmd_kick(settings: Settings, args: argparse.Namespace) -> int:
    async with _queue(settings) as queue:
        await queue.use(settings.beanstalkd.tube)
        kicked = await queue.kick(args.bound)
    print(f"kicked {kicked} job(s) in tube {settings.beanstalkd.tube}")
    return 0


async def cmd_vendors(settings: Settings, args: argparse.Namespace) -> int:
    async with MailStore(settings) as store:
        marks = await store.vendor_marks()
    now = time.time()
    rows: list[dict[str, Any]] = []
    for name in settings.vendor_order():
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
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if r["available"]:
                state = "available"
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(r["unavailable_until"]))
                state = f"unavailable until {when} ({r['reason']})"
            print(f"{r['vendor']:<11} {r['mode']:<9} {state}")
    return 0


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=None, help="configuration file (default: ./config.toml if present)"
    )
    common.add_argument("--test", action="store_true", help="use the [test] tube and collections")
    common.add_argument("-v", "--verbose", action="store_true")

    p = argparse.ArgumentParser(prog="mailer", description="Operate the mailer service.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("send", parents=[common], help="send one mail; prints its id")
    s.add_argument("--json", metavar="FILE", help="the mail as a JSON document ('-' for stdin)")
    s.add_argument("--from", dest="from_", metavar="ADDRESS")
    s.add_argument("--to", action="append", default=[], metavar="ADDRESS")
    s.add_argument("--cc", action="append", default=[], metavar="ADDRESS")
    s.add_argument("--bcc", action="append", default=[], metavar="ADDRESS")
    s.add_argument("--reply-to", dest="reply_to", action="append", default=[], metavar="ADDRESS")
    s.add_argument("--subject")
    s.add_argument("--text")
    s.add_argument("--html")
    s.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    s.add_argument("--tag", action="append", default=[])
    s.add_argument("--priority", type=int)
    s.add_argument("--delay", type=float, help="seconds before the mail may go out")
    s.add_argument("--idempotency-key", dest="idempotency_key")
    s.set_defaults(func=cmd_send)

    st = sub.add_parser("status", parents=[common], help="a mail's record and attempts")
    st.add_argument("id")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    sa = sub.add_parser("stats", parents=[common], help="tube counts and mail status counts")
    sa.add_argument("--json", action="store_true")
    sa.set_defaults(func=cmd_stats)

    rq = sub.add_parser("requeue", parents=[common], help="queue again the mails no live job can deliver")
    rq.add_argument("--older-than", type=parse_duration, default=None, help="e.g. 10m (default: config)")
    rq.add_argument("--dry-run", action="store_true")
    rq.set_defaults(func=cmd_requeue)

    k = sub.add_parser("kick", parents=[common], help="move buried jobs back to ready")
    k.add_argument("--bound", type=int, default=1_000_000, help="at most this many")
    k.set_defaults(func=cmd_kick)

    v = sub.add_parser("vendors", parents=[common], help="each vendor's availability")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_vendors)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    prog = f"mailer {args.command}"
    try:
        settings = load_settings(args.config, test=args.test)
        if args.command == "requeue" and args.older_than is None:
            args.older_than = settings.consumer.requeue_older_than_s
        func: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = args.func
        return asyncio.run(func(settings, args))
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except EmailValidationError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except MailerError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except PyMongoError as exc:
        print(
            f"{prog}: MongoDB error ({type(exc).__name__}); check mongodb.uri and the server", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
