"""Logging set-up shared by ``mailer``, ``mailer-consumer`` and ``mailer-api``.

Two formats: ``text`` for a terminal, ``json`` (one object per line: ``ts``, ``level``,
``logger``, ``message`` and any ``extra=`` fields) for a log shipper, which then needs no
parsing rules of its own. Our INFO lines carry ids, vendors and outcomes, never bodies or
recipients.

At DEBUG, several client libraries print credentials: botocore logs the signed request with
the access key id and session token, httpx/httpcore the request headers (API keys), aiosmtplib
the AUTH exchange (base64 of the password), hpack the decoded HTTP/2 headers. So ``DEBUG`` is
ours alone: those loggers stay at INFO unless ``debug_third_party`` asks for them as well
(``--debug-third-party``, for a session with throwaway credentials). pymongo is one of them:
its command log at DEBUG prints whole mail documents (recipients, bodies).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["FORMATS", "THIRD_PARTY_LOGGERS", "JsonFormatter", "setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")
# What every LogRecord has: anything else on a record came from ``extra=`` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

#: Loggers that print credentials or whole requests at DEBUG (children follow their parent).
THIRD_PARTY_LOGGERS = (
    "aioboto3",
    "aiobotocore",
    "boto3",
    "botocore",
    "s3transfer",
    "urllib3",
    "aiohttp",
    "httpx",
    "httpcore",
    "hpack",
    "h2",
    "h11",
    "aiosmtplib",
    "pymongo",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a value JSON cannot hold is written as its ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _Handler(logging.StreamHandler[TextIO]):
    """Ours, so that a second set-up (tests, a library caller) replaces it, not adds to it."""


def setup_logging(level: int | str, *, debug_third_party: bool = False, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt``; third-party loggers no lower than INFO unless asked."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use text or json")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(numeric)
    floor = numeric if debug_third_party else max(numeric, logging.INFO)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(floor)
