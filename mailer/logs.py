"""Logging set-up shared by ``mailer`` and ``mailer-consumer``.

At DEBUG, several client libraries print credentials: botocore logs the signed request with
the access key id and session token, httpx/httpcore the request headers (API keys), aiosmtplib
the AUTH exchange (base64 of the password), hpack the decoded HTTP/2 headers. So ``DEBUG`` is
ours alone: those loggers stay at INFO unless ``debug_third_party`` asks for them as well
(``--debug-third-party``, for a session with throwaway credentials).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["THIRD_PARTY_LOGGERS", "setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

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
)


def setup_logging(level: int | str, *, debug_third_party: bool = False) -> None:
    """Log to stderr at ``level``; third-party loggers no lower than INFO unless asked."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=numeric, format=FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(numeric)  # basicConfig does nothing when handlers exist
    floor = numeric if debug_third_party else max(numeric, logging.INFO)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(floor)
