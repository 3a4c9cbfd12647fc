"""Logs: --log-format json (one object per line with extra fields), the one INFO line per
settled mail (ids, vendor, outcome, ms; no recipients or bodies), pymongo quiet at DEBUG."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from helpers import produce, running_consumer, wait_until

from mailer import logs
from mailer.config import Settings
from mailer.vendors.fake import FakeVendor


class Err:
    """What the handler wrote to (pytest's captured) stderr."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Err]:
    yield Err(capsys)
    logs.setup_logging(logging.WARNING)  # back to a quiet root for the next tests


def test_json_lines_carry_ts_level_logger_message_and_extras(stderr: Err) -> None:
    logs.setup_logging("info", fmt="json")
    logs.setup_logging("info", fmt="json")  # a second set-up replaces the handler, not adds one
    logging.getLogger("mailer.test").info("hello %s", "there", extra={"mail_id": "abc", "ms": 1.5})
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1, lines
    entry = json.loads(lines[0])
    assert entry["level"] == "INFO" and entry["logger"] == "mailer.test"
    assert entry["message"] == "hello there" and entry["mail_id"] == "abc" and entry["ms"] == 1.5
    assert entry["ts"].endswith("+00:00")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text or json"):
        logs.setup_logging("info", fmt="xml")


@pytest.mark.parametrize(("third_party", "shown"), [(False, False), (True, True)])
def test_pymongo_command_logging_stays_off_at_debug_unless_asked(
    stderr: Err, third_party: bool, shown: bool
) -> None:
    logs.setup_logging("debug", debug_third_party=third_party)
    logging.getLogger("pymongo.command").debug('{"insert": "mails", "documents": [...]}')
    assert ('"insert"' in stderr.getvalue()) is shown


async def test_one_info_line_per_settled_mail_without_recipients_or_bodies(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailer.jobs")
    async with running_consumer(settings, [FakeVendor("amazon")], concurrency=2) as consumer:
        ids = await produce(settings, 3)
        await wait_until(lambda: consumer.processed >= 3, within=20, what="3 settled jobs")
    settled = [r for r in caplog.records if r.name == "mailer.jobs" and getattr(r, "outcome", None)]
    assert sorted(getattr(r, "mail_id", "") for r in settled) == sorted(ids)
    for record in settled:
        assert record.levelno == logging.INFO
        fields = vars(record)
        assert (fields["vendor"], fields["outcome"], fields["action"]) == ("amazon", "sent", "delete")
        assert isinstance(fields["job_id"], int) and fields["ms"] >= 0
        text = logs.JsonFormatter().format(record)
        assert "rcpt" not in text and "Hello there" not in text, text
