"""The two command lines' conventions: MAILER_ENV, exit codes, one-line errors (never a
traceback) for configuration and MongoDB problems, --json everywhere, one duration parser,
counts, help texts, `mailer vendors --reset`, "simulated" in `mailer status`.

`mailer` runs in this process (in a thread: it runs its own event loop); `mailer-consumer`
runs as a real console script, since it installs signal handlers on its main thread."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bson import ObjectId
from conftest import drain_tube
from helpers import consumer_env, produce, running_consumer, wait_until

from mailer import cli, logs
from mailer import consumer as consumer_module
from mailer.cmdline import UsageError, loop_factory
from mailer.config import Settings
from mailer.consumer import _parser as consumer_parser
from mailer.consumer import main as consumer_main
from mailer.store import MailStore
from mailer.vendors.fake import FakeVendor
from mailer.vendors.simulated import SimulatedVendor

BIN = Path(sys.executable).parent
PASSWORD = "S3CRET-PASS"


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """`mailer ... --test` in this process sees this test's tube and collections only."""
    for key in list(os.environ):
        if key.startswith("MAILER_"):
            monkeypatch.delenv(key)
    for key, value in consumer_env(settings).items():
        if key.startswith("MAILER_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no mailer.toml of the checkout
    return settings


async def mailer(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def consumer(settings: Settings, *argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "mailer-consumer"), "--test", *argv],
        env=consumer_env(settings, **env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- MAILER_ENV ---------------------------------------------------------------------------

COMMANDS = [
    ["send", "--test", "--from", "a@example.com", "--to", "b@example.com", "--subject", "s", "--text", "t"],
    ["status", "--test", "0123456789abcdef01234567"],
    ["stats", "--test"],
    ["requeue", "--test", "--dry-run"],
    ["kick", "--test"],
    ["vendors", "--test"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=[c[0] for c in COMMANDS])
async def test_a_bad_mailer_env_stops_every_command_with_one_line(
    cli_env: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setenv("MAILER_ENV", "prod")
    rc, out, err = await mailer(capsys, *argv)
    assert (rc, out) == (2, "")
    assert one_line(err).startswith(f"mailer {argv[0]}: ")
    assert "MAILER_ENV='prod'" in err and "development, test, production" in err


@pytest.mark.parametrize("value", ["prod", "Staging"])
def test_a_bad_mailer_env_stops_the_consumer_with_one_line(
    settings: Settings, tmp_path: Path, value: str
) -> None:
    done = consumer(settings, cwd=tmp_path, MAILER_ENV=value)
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr).startswith("mailer-consumer: ")
    assert f"MAILER_ENV={value!r}" in done.stderr


async def test_production_without_vendors_is_one_clear_line_in_both(
    cli_env: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`mailer vendors` used to show four real vendors as available while the consumer refused."""
    monkeypatch.setenv("MAILER_ENV", "Production")
    rc, out, err = await mailer(capsys, "vendors", "--test")
    assert (rc, out) == (2, "")
    assert "at least one [vendors.NAME] section" in one_line(err)
    done = consumer(cli_env, cwd=tmp_path, MAILER_ENV="PRODUCTION")
    assert done.returncode == 2
    assert "at least one [vendors.NAME] section" in one_line(done.stderr)
    assert "vendors.order" not in done.stderr  # no order was set


# --- MongoDB start-up errors: one line, never a traceback, never the password -------------------

BAD_URIS = {
    "bad-scheme": f"mongo://bob:{PASSWORD}@127.0.0.1:27017/mailer",
    "unescaped-at": f"mongodb://bob:{PASSWORD}@x@127.0.0.1:27017/mailer",
    "unescaped-slash": f"mongodb://bob:{PASSWORD}/x@127.0.0.1:27017/mailer",
    "refused-credentials": f"mongodb://bob:{PASSWORD}@127.0.0.1:27017/mailer",
}


@pytest.mark.parametrize("case", BAD_URIS, ids=list(BAD_URIS))
@pytest.mark.parametrize("command", ["stats", "status", "vendors", "requeue"])
async def test_a_bad_mongodb_uri_is_one_line_in_every_command(
    cli_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
    command: str,
) -> None:
    monkeypatch.setenv("MAILER_MONGODB__URI", BAD_URIS[case])
    argv = [command, "--test"] + (["0123456789abcdef01234567"] if command == "status" else [])
    rc, out, err = await mailer(capsys, *argv)
    assert (rc, out) == (2, ""), err
    assert "mongodb.uri" in one_line(err)
    assert PASSWORD not in err


@pytest.mark.parametrize("case", BAD_URIS, ids=list(BAD_URIS))
def test_a_bad_mongodb_uri_is_one_line_in_the_consumer(settings: Settings, tmp_path: Path, case: str) -> None:
    done = consumer(settings, cwd=tmp_path, MAILER_MONGODB__URI=BAD_URIS[case])
    assert done.returncode == 2, done.stderr
    assert "mongodb.uri" in one_line(done.stderr)
    assert PASSWORD not in done.stderr


async def test_an_unreachable_mongodb_is_one_line_and_exit_1(
    cli_env: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAILER_MONGODB__URI", "mongodb://127.0.0.1:1/mailer")
    monkeypatch.setenv("MAILER_MONGODB__TIMEOUT_MS", "200")
    rc, out, err = await mailer(capsys, "stats", "--test")
    assert (rc, out) == (1, "")
    assert "cannot reach MongoDB" in one_line(err)


# --- usage: one line and a hint, counts, durations, help ----------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nosuch"],
        ["status"],
        ["kick", "--bound", "-1"],
        ["kick", "--bound", "0"],
        ["send", "--priority", "-1"],
        ["send", "--delay", "-5s"],
        ["send", "--delay", "5 minutes"],
        ["requeue", "--older-than", "soon"],
    ],
)
async def test_usage_errors_are_one_line_with_a_hint(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    rc, out, err = await mailer(capsys, *argv)
    assert (rc, out) == (2, "")
    assert one_line(err).startswith("mailer")
    assert "--help'" in err and "usage:" not in err


@pytest.mark.parametrize("argv", [["-c", "-1"], ["--concurrency", "0"], ["--log-level", "loud"], ["--bogus"]])
def test_consumer_usage_errors_are_one_line_with_a_hint(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    # main() returns before it starts anything, so this process is fine for these.
    assert consumer_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "(see 'mailer-consumer --help')" in one_line(err)


def test_consumer_short_options_and_lower_case_log_level() -> None:
    args = consumer_parser().parse_args(["-c", "7", "-l", "debug", "--test"])
    assert (args.concurrency, args.log_level) == (7, "DEBUG")
    assert consumer_parser().parse_args(["--log-level", "Warning"]).log_level == "WARNING"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1.5m", 90)]
)
def test_one_duration_parser(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-5", "5x", "", "m", "5 minutes"])
def test_durations_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        cli.parse_duration(text)


def _parsers() -> list[argparse.ArgumentParser]:
    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return [top, *sub.choices.values(), consumer_parser()]


@pytest.mark.parametrize("parser", _parsers(), ids=lambda p: p.prog)
def test_every_option_has_help_and_every_command_a_description(parser: argparse.ArgumentParser) -> None:
    assert parser.description
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            assert action.help and action.help != argparse.SUPPRESS, (parser.prog, action.dest)
    text = parser.format_help()
    for documented in ("exit codes", "MAILER_ENV", "MAILER_CONFIG", "configuration error"):
        assert documented in text, (parser.prog, documented)


# --- --json everywhere, durations in send, requeue ids ----------------------------------------


async def test_send_json_prints_the_id_and_delay_takes_a_duration(
    cli_env: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["--from", "a@example.com", "--to", "b@example.com", "--subject", "s", "--text", "t"]
    rc, out, err = await mailer(capsys, "send", "--test", "--json", "--delay", "5m", *args)
    assert rc == 0, err
    mail_id = json.loads(out)["id"]
    async with MailStore(cli_env) as store:
        assert (await store.get(mail_id)).email.delay == 300

    # The input file has its own name now.
    path = tmp_path / "mail.json"
    path.write_text(json.dumps({"from": "a@example.com", "to": "b@example.com", "subject": "s", "text": "t"}))
    rc, out, err = await mailer(capsys, "send", "--test", "--file", str(path))
    assert rc == 0 and len(out.strip()) == 24, err


async def test_requeue_dry_run_json_lists_the_ids(
    cli_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await produce(cli_env, 3)
    await drain_tube(cli_env)  # their jobs are lost: orphans
    rc, out, err = await mailer(capsys, "requeue", "--test", "--dry-run", "--older-than", "0s", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["dry_run"] is True
    assert sorted(report["requeued"]) == sorted(ids)


async def test_kick_json(cli_env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await mailer(capsys, "kick", "--test", "--json", "--bound", "5")
    assert rc == 0, err
    assert json.loads(out) == {"tube": cli_env.beanstalkd.tube, "kicked": 0}


# --- simulated sends, vendor marks ------------------------------------------------------------


async def test_status_says_simulated_for_a_simulated_send(
    cli_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    for vendor, simulated in ((SimulatedVendor("amazon"), True), (FakeVendor("amazon"), False)):
        (mail_id,) = await produce(cli_env, 1)
        async with MailStore(cli_env) as store, running_consumer(cli_env, [vendor], concurrency=1):
            deadline = time.monotonic() + 20
            while (await store.get(mail_id)).status.value != "sent":
                assert time.monotonic() < deadline, "the mail was not sent"
                await asyncio.sleep(0.05)
        rc, out, err = await mailer(capsys, "status", "--test", mail_id)
        assert rc == 0, err
        assert ("simulated" in out) is simulated, out
        rc, out, err = await mailer(capsys, "status", "--test", "--json", mail_id)
        assert json.loads(out)["simulated"] is simulated


async def test_vendors_reset_clears_a_mark(cli_env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    async with MailStore(cli_env) as store:
        await store.mark_vendor("mailgun", time.time() + 600, "401 bad key")
    rc, out, err = await mailer(capsys, "vendors", "--test", "--json")
    rows = {r["vendor"]: r for r in json.loads(out)}
    assert rows["mailgun"]["available"] is False and rows["amazon"]["available"] is True
    assert {r["mode"] for r in rows.values()} == {"simulated"}

    rc, out, err = await mailer(capsys, "vendors", "--test", "--reset", "mailgun")
    assert rc == 0, err
    assert "mailgun: mark cleared" in out
    rc, out, err = await mailer(capsys, "vendors", "--test", "--json")
    assert all(r["available"] for r in json.loads(out))

    rc, out, err = await mailer(capsys, "vendors", "--test", "--reset", "postmark")
    assert (rc, out) == (2, "")
    assert "postmark" in one_line(err)


async def test_cancel_a_queued_mail_then_too_late_and_unknown(
    cli_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = await produce(cli_env, 2)
    rc, out, err = await mailer(capsys, "cancel", "--test", first)
    assert (rc, err) == (0, "") and "cancelled" in out
    rc, out, err = await mailer(capsys, "cancel", "--test", "--json", first)  # again: still cancelled
    assert rc == 0 and json.loads(out) == {"id": first, "cancelled": True, "status": "cancelled"}
    async with MailStore(cli_env) as store:
        assert (await store.get(first)).status.value == "cancelled"
        await store.mails.update_one({"_id": ObjectId(second)}, {"$set": {"status": "sent"}})
    rc, out, err = await mailer(capsys, "cancel", "--test", second)
    assert (rc, out) == (1, "") and "sent" in one_line(err) and "too late" in err
    rc, out, err = await mailer(capsys, "cancel", "--test", "--json", second)
    assert rc == 1 and json.loads(out)["status"] == "sent"
    for unknown in ("0123456789abcdef01234567", "not-an-id"):
        rc, out, err = await mailer(capsys, "cancel", "--test", unknown)
        assert (rc, out) == (1, "") and "no mail with id" in one_line(err)


# --- mailer check ---------------------------------------------------------------------------


async def test_check_fails_without_a_live_consumer_and_passes_with_one(
    cli_env: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = await mailer(capsys, "check", "--test")
    lines = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("vendor"))
    assert rc == 1 and lines["beanstalkd"].startswith("ok") and lines["mongodb"].startswith("ok")
    assert lines["consumers"].startswith("FAIL")
    async with running_consumer(cli_env, [FakeVendor("amazon")], concurrency=1) as consumer:
        async with MailStore(cli_env) as store:
            tube = cli_env.beanstalkd.tube
            await wait_until(lambda: store.live_consumers(tube, seen_since=0), within=10, what="a heartbeat")
        rc, out, _ = await mailer(capsys, "check", "--test", "--json")
    report = json.loads(out)
    assert rc == 0 and report["ok"] is True, report
    consumers = next(c for c in report["checks"] if c["component"] == "consumers")
    assert consumer.consumer_id in consumers["detail"]


async def test_check_says_fail_for_an_unreachable_mongodb(
    cli_env: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILER_MONGODB__URI", f"mongodb://{PASSWORD}:{PASSWORD}@127.0.0.1:1/x")
    monkeypatch.setenv("MAILER_MONGODB__TIMEOUT_MS", "300")
    rc, out, err = await mailer(capsys, "check", "--test")
    assert rc == 1 and "mongodb" in out and "FAIL" in out and PASSWORD not in out + err


def test_every_process_takes_log_format() -> None:
    from mailer.service.server import _parser as api_parser

    consumer_args = consumer_parser().parse_args(["--log-format", "json", "--metrics-port", "9108"])
    assert (consumer_args.log_format, consumer_args.metrics_port) == ("json", 9108)
    assert api_parser().parse_args(["--log-format", "json"]).log_format == "json"
    assert cli.build_parser().parse_args(["check", "--log-format", "json"]).log_format == "json"


def test_the_event_loop_choice() -> None:
    assert loop_factory("asyncio") is None
    uvloop = pytest.importorskip("uvloop")
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop


def test_uvloop_asked_for_and_missing_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(UsageError, match="uvloop is not installed"):
        loop_factory("uvloop")


@pytest.mark.parametrize(
    ("argv", "loop_module"),
    [
        ([], "uvloop"),
        (["--loop", "auto"], "uvloop"),
        (["--uvloop"], "uvloop"),
        (["--loop", "asyncio"], "asyncio"),
    ],
)
def test_the_consumer_runs_on_the_loop_asked_for(
    cli_env: Settings, monkeypatch: pytest.MonkeyPatch, argv: list[str], loop_module: str
) -> None:
    """uvloop by default when installed, as mailer-api does; ``--loop asyncio`` opts out."""
    pytest.importorskip("uvloop")
    seen: list[str] = []

    async def serve(settings: Settings, concurrency: int | None) -> int:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])
        return 0

    monkeypatch.setattr(consumer_module, "_serve", serve)
    monkeypatch.setattr(logs, "setup_logging", lambda *a, **k: None)  # this process's logging stays
    assert consumer_main(["--test", *argv]) == 0
    assert seen == [loop_module]


def test_the_consumer_refuses_uvloop_by_name_when_it_is_missing(
    cli_env: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    monkeypatch.setattr(logs, "setup_logging", lambda *a, **k: None)
    assert consumer_main(["--test", "--loop", "uvloop"]) == 2
    assert "uvloop is not installed" in one_line(capsys.readouterr().err)


def test_the_startup_heap_is_frozen_out_of_full_collections() -> None:
    """What start-up left alive is no longer walked by every full collection."""
    import gc

    from mailer.cmdline import freeze_startup_heap

    assert gc.get_freeze_count() == 0
    kept = [[i] for i in range(10_000)]  # long-lived, tracked objects, as modules and models are
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(kept)
        assert not any(o is kept[0] for o in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()
