"""``mailer-api``: the HTTP API on uvicorn, bound to ``[api] host``/``port`` (127.0.0.1:8025).

Start-up follows the CLI's conventions (exit codes, one line on stderr, ``--version``): the
Producer connects before the server listens, so a bad configuration or an unreachable
MongoDB stops it with one line instead of a server that answers 503 to everything.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import uvicorn

from mailer.cmdline import (
    CommandParser,
    add_logging,
    add_loop,
    add_version,
    count,
    freeze_startup_heap,
    loop_factory,
    parse_args,
    run_guarded,
)
from mailer.config import DEFAULT_CONFIG_FILE, Settings, load_settings
from mailer.errors import ConfigError
from mailer.logs import setup_logging
from mailer.producer import Producer
from mailer.service.app import create_app
from mailer.service.auth import is_loopback

log = logging.getLogger("mailer.service")
LOOPBACK = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="mailer-api",
        description="Serve the HTTP API: POST /v1/emails, /v1/emails/batch, GET and DELETE "
        "/v1/emails/ID, /v1/health, /v1/ready, /metrics; the schema at /openapi.json, docs at /docs.",
    )
    add_version(p)
    p.add_argument(
        "--config", metavar="PATH", default=None, help=f"configuration file (default ./{DEFAULT_CONFIG_FILE})"
    )
    p.add_argument("--test", action="store_true", help="use the [test] tube and collections")
    p.add_argument("--host", default=None, help="listen address (default: [api] host, 127.0.0.1)")
    p.add_argument("--port", type=count(1), default=None, help="listen port (default: [api] port, 8025)")
    add_loop(p)  # uvloop: about a fifth less CPU per request
    add_logging(p, third_party="they print whole requests")
    return p


def bind_address(settings: Settings, host: str | None) -> str:
    """Where to listen. Production needs a key; without one the API serves loopback only."""
    host = host or settings.api.host
    if settings.api.keys:
        return host
    if settings.production:
        raise ConfigError(
            "mailer-api in production needs at least one API key: set [api] keys (a key, or "
            "'sha256:<hex>' of it) or MAILER_API__KEYS='[\"...\"]'"
        )
    if not is_loopback(host):
        log.warning("no [api] keys: not listening on %s; serving loopback (%s) only", host, LOOPBACK)
        host = LOOPBACK
    return host


async def serve(settings: Settings, host: str, port: int) -> int:
    async with Producer(settings) as producer:
        app = create_app(settings, producer=producer)
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, server_header=False, lifespan="on"
        )
        server = uvicorn.Server(config)
        auth = (
            f"{len(settings.api.keys)} API key(s)"
            if settings.api.keys
            else "no API keys: unauthenticated, loopback clients only"
        )
        log.info(
            "mailer-api on http://%s:%d (%s), tube %r, collection %r",
            host,
            port,
            auth,
            settings.beanstalkd.tube,
            settings.mongodb.collection,
        )
        freeze_startup_heap()
        await server.serve()
        return 0 if server.started else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(_parser(), argv)
    if isinstance(args, int):
        return args
    setup_logging(args.log_level, debug_third_party=args.debug_third_party, fmt=args.log_format)

    def start() -> int:
        settings = load_settings(args.config, test=args.test)
        host = bind_address(settings, args.host)
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            return runner.run(serve(settings, host, args.port or settings.api.port))

    return run_guarded("mailer-api", start)


if __name__ == "__main__":
    sys.exit(main())
