"""Smoke test of the load-test tooling: a tiny real run, and the production refusal.

Speed is not asserted here (that is the benchmark's job); only that the tooling drives the
real pipeline to the end and reports numbers that are internally consistent.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console

from loadtest.procstat import cpu_seconds, memory_kb
from loadtest.run import Options, run_loadtest
from loadtest.summary import percentile
from mailer.config import Settings
from mailer.store import MailStore


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 95) == 7.0


def test_procstat_reads_this_process() -> None:
    assert (cpu_seconds(os.getpid()) or 0.0) > 0.0
    mem = memory_kb(os.getpid())
    assert mem is not None and 0 < mem[0] <= mem[1]
    assert cpu_seconds(2**22 + 12345) is None


@pytest.mark.timeout(60)
async def test_small_load_test_delivers_every_mail(base_settings: Settings) -> None:
    out = io.StringIO()
    opts = Options(mails=50, producers=1, mode="send", consumers=1, concurrency=10, timeout=45)
    summary = await run_loadtest(base_settings, opts, Console(file=out, width=120))
    summary.render(Console(file=out, width=120))
    report = out.getvalue()

    assert summary.ok, report
    assert (summary.produced, summary.queued, summary.delivered.sent) == (50, 50, 50), report
    lat = summary.delivered.latencies_s
    assert len(lat) == 50 and 0 <= lat[0] <= percentile(lat, 50) <= percentile(lat, 99) < 30
    assert summary.producer_rate > 0 and summary.e2e_rate > 0
    groups = {u.group for u in summary.procs}
    assert {"producer", "consumer", "loadtest"} <= groups
    consumer = next(u for u in summary.procs if u.group == "consumer")
    assert consumer.cpu_s > 0 and consumer.peak_rss_kb > 10 * 1024
    assert "Load test summary" in report and "consumer-1" in report

    # The run's own collection is gone afterwards.
    async with MailStore(base_settings.for_test()) as store:
        names = await store.mails.database.list_collection_names()
    assert summary.run_id and f"{base_settings.test.collection}_lt_{summary.run_id}" not in names


@pytest.mark.parametrize("args", [["loadtest", "--mails", "5"], ["loadtest.bench", "--quick"]])
def test_refuses_to_run_in_production(args: list[str]) -> None:
    env = dict(os.environ, MAILER_ENV="production")
    done = subprocess.run(
        [sys.executable, "-m", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "MAILER_ENV=production" in done.stderr
