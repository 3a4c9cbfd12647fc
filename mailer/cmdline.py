"""What every console script shares at its edge: one-line usage errors, durations, counts,
``--version``, and one mapping from errors to exit codes, so ``mailer``, ``mailer-consumer``
and ``mailer-api`` behave alike.

Exit codes: 0 ok; 1 a runtime or service error (MongoDB or beanstalkd unreachable, a mail
refused or not found); 2 a usage or configuration error (bad arguments, an unusable
configuration file, MAILER_* variable or MongoDB URI, production without vendors); 130
interrupted. Every error is one line on stderr that says what to do; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pymongo.errors import ConfigurationError, PyMongoError

from mailer import __version__
from mailer.config import DEFAULT_CONFIG_FILE, ENVIRONMENTS
from mailer.errors import ConfigError, MailerError, VendorConfigError
from mailer.logs import FORMATS

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def freeze_startup_heap() -> None:
    """Take what start-up left alive (modules, models, SDK clients) out of the collector's sight.

    These live until exit anyway, yet every full collection walks them: about 110,000 objects
    and 77 ms for a consumer with its vendors loaded, a pause that stops every loop at once
    and can carry a send past its deadline. Call once the service is connected, before it
    serves; the objects made afterwards are collected as usual.
    """
    gc.collect()
    gc.freeze()


EPILOG = f"""\
exit codes:
  0    done
  1    runtime or service error: MongoDB or beanstalkd unreachable, a mail refused or not found
  2    usage or configuration error: bad arguments, an unusable configuration file, MAILER_*
       variable or mongodb.uri, MAILER_ENV=production without a [vendors.NAME] section
  130  interrupted

environment:
  MAILER_ENV     {", ".join(ENVIRONMENTS)} (any case; development is the default);
                 only production sends through real vendors, any other value is refused
  MAILER_CONFIG  the configuration file when --config is not given (default: ./{DEFAULT_CONFIG_FILE})
  MAILER_*       any configuration key, nested with __ (MAILER_BEANSTALKD__PORT=11301); beats the file
"""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """Bad arguments found after parsing: exit 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual but keeps the laid-out tables (exit codes, environment)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class CommandParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line plus a hint, not the whole usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("epilog", EPILOG)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` -> seconds; the one parser of every duration."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use e.g. 90, 30s, 10m, 2h")
    return float(m.group(1)) * _UNITS[m.group(2)]


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type for a whole number of at least ``minimum`` (negative counts refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit"
    )


def add_logging(parser: argparse.ArgumentParser, *, third_party: str) -> None:
    """``-l/--log-level``, ``--debug-third-party`` and ``--log-format``, the same on every
    long-running process; ``third_party`` says what those libraries would print."""
    parser.add_argument(
        "-l",
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR, any case (default: INFO)",
    )
    parser.add_argument(
        "--debug-third-party",
        action="store_true",
        help=f"let client libraries log at DEBUG too: {third_party}",
    )
    add_log_format(parser)


def add_loop(parser: argparse.ArgumentParser) -> None:
    """``--loop auto|asyncio|uvloop``, the same on every long-running process."""
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: auto (uvloop when installed, as uvicorn does: pip install 'mailer[fast]'), "
        "asyncio or uvloop (default: auto)",
    )


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to run on; None is asyncio's own. ``uvloop`` asked for by name and
    missing is a usage error, not a silent fallback; ``auto`` falls back quietly."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError("--loop uvloop: uvloop is not installed (pip install 'mailer[fast]')") from None
        return None
    return uvloop.new_event_loop


def add_log_format(parser: argparse.ArgumentParser) -> None:
    """``--log-format text|json``, the same on every console script."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text for a terminal, json for a log shipper: one object per line (default: text)",
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit code of --help/--version/a usage error, so that
    ``main()`` returns its code instead of raising SystemExit in a caller's process."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def _exit_code(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line for an expected error; anything else is a bug."""
    if isinstance(exc, UsageError | ConfigError | VendorConfigError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, MailerError):
        return EXIT_FAILURE, str(exc)
    if isinstance(exc, ConfigurationError):
        # Never the driver's message: it may quote the URI, which may hold a password.
        return EXIT_USAGE, f"MongoDB configuration error ({type(exc).__name__}): check mongodb.uri"
    if isinstance(exc, PyMongoError):
        return EXIT_FAILURE, f"MongoDB error ({type(exc).__name__}); check mongodb.uri and the server"
    raise exc


def run_guarded(prog: str, action: Callable[[], int]) -> int:
    """Run a command; each expected error becomes one line on stderr and its exit code."""
    try:
        return action()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into `head`
        return EXIT_OK
    except (MailerError, PyMongoError, UsageError) as exc:
        code, line = _exit_code(exc)
        print(f"{prog}: {line}", file=sys.stderr)
        return code
