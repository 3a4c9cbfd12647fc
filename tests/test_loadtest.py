"""Smoke tests of the load-test tooling: tiny real runs, the production refusal, running
consumers found and used, throughput lines passed through, and what a run leaves behind.

Speed is not asserted here (that is the benchmark's job); only that the tooling drives the
real pipeline to the end and reports numbers that are internally consistent. Every run here
gets a [test] section of its own (``lt_base``), so "the [test] tube" is private to the test.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, ConsumerProcess, mail, wait_until
from rich.console import Console

from loadtest.common import drain_tube, drop_collections, tube_stats
from loadtest.procstat import cpu_seconds, memory_kb
from loadtest.run import Options, run_loadtest
from loadtest.summary import Summary, percentile
from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.models import Email
from mailer.store import MailStore


@pytest.fixture
async def lt_base(base_settings: Settings) -> AsyncIterator[Settings]:
    """Settings whose [test] tube and collections are this test's own; removed afterwards."""
    suffix = f"_lt{uuid.uuid4().hex[:8]}"
    t = base_settings.test
    test = t.model_copy(
        update={
            "tube": t.tube + suffix,
            "collection": t.collection + suffix,
            "vendor_status_collection": t.vendor_status_collection + suffix,
        }
    )
    base = base_settings.model_copy(update={"test": test})
    yield base
    await drain_tube(base.for_test())
    await drop_collections(base.for_test())


async def _foreign_mail(settings: Settings) -> str:
    """A stored mail (with no job) that no load test created: it must survive every run."""
    async with MailStore(settings) as store:
        mail_id, _ = await store.insert(MailStore.new_document(Email.model_validate(mail(1)), priority=1))
        return mail_id


async def _count(settings: Settings, query: dict[str, Any]) -> int:
    async with MailStore(settings) as store:
        return await store.mails.count_documents(query)


async def _run(base: Settings, opts: Options) -> tuple[Summary, str]:
    out = io.StringIO()
    console = Console(file=out, width=160)
    summary = await run_loadtest(base, opts, console)
    summary.render(console)
    return summary, out.getvalue()


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 95) == 7.0


def test_raw_baselines_do_not_depend_on_the_code_under_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw MongoDB baselines keep one frozen document shape: built by the producer's own
    code, they would move with it and hide (or invent) a change in every ratio."""
    from loadtest import raw
    from mailer.store import MailStore

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a baseline document came from MailStore.new_document")

    monkeypatch.setattr(MailStore, "new_document", staticmethod(refuse))
    docs = raw.baseline_docs(3)
    assert [list(d) for d in docs] == [
        ["_id", "status", "mail", "priority", "created_at", "next_attempt_ts", "batch", "queued_ts"]
    ] * 3
    assert len({d["_id"] for d in docs}) == 3
    assert [d["mail"]["to"] for d in docs] == ["user0@example.com", "user1@example.com", "user2@example.com"]


def test_compare_sets_both_sides_of_a_round_against_one_baseline() -> None:
    """A round whose baseline swung (the 'after' run's raw insert_one twice as fast) must not
    read as the code getting slower: each side's ratio is taken to the round's shared
    baseline, so the verdict is the change of the row itself, in the row's direction."""
    from loadtest.compare import compare

    before = {"raw_insert_one": 500.0, "send": 1000.0, "raw_insert_one_cpu": 700.0, "cpu_send": 140.0}
    after = {"raw_insert_one": 1000.0, "send": 1100.0, "raw_insert_one_cpu": 700.0, "cpu_send": 150.0}
    slow = {"drain_100": 470.0}
    rows = {r["key"]: r for r in compare([(before | slow, after | {"drain_100": 490.0})] * 3)}
    send = rows["send"]
    # Against their own runs' baselines the ratio would read 2.0 -> 1.1, a "regression".
    shared = (500.0 * 1000.0) ** 0.5
    assert send["before"] == pytest.approx(1000 / shared) and send["after"] == pytest.approx(1100 / shared)
    assert send["change"] == pytest.approx(1.1) and send["no_worse"] and not send["lower_is_better"]
    cpu = rows["cpu_send"]
    assert cpu["lower_is_better"] and cpu["change"] == pytest.approx(150 / 140) and not cpu["no_worse"]
    d100 = rows["drain_100"]  # a fixed scale (ideal:500) stays as it is
    assert d100["before"] == pytest.approx(0.94) and d100["after"] == pytest.approx(0.98)
    assert "send_many" not in rows  # a row missing from a side in any round is left out
    # The verdict is the median of the rounds, not their mean: one wild round does not decide.
    wild = after | {"send": 5000.0}
    many = compare([(before, after), (before, wild), (before, after | {"send": 900.0})])
    assert {r["key"]: r for r in many}["send"]["change"] == pytest.approx(1.1)


def test_compare_by_case_judges_the_adjacent_pairs() -> None:
    """--by-case: each round's two runs of a case are seconds apart, so the verdict is the
    median of their after / before, in the row's direction, with no baseline at all."""
    from loadtest.compare import changes

    rounds = [
        ({"send": 1000.0, "cpu_send": 100.0}, {"send": 1100.0, "cpu_send": 95.0}),
        ({"send": 500.0, "cpu_send": 200.0}, {"send": 540.0, "cpu_send": 210.0}),  # a slow minute
        ({"send": 900.0, "cpu_send": 110.0}, {"send": 990.0, "cpu_send": 100.0}),
    ]
    rows = {r["key"]: r for r in changes(rounds)}
    assert rows["send"]["change"] == pytest.approx(1.1) and rows["send"]["no_worse"]
    assert rows["cpu_send"]["change"] == pytest.approx(0.95) and rows["cpu_send"]["lower_is_better"]
    assert rows["send"]["changes"] == pytest.approx([1.1, 1.08, 1.1])
    assert set(rows) == {"send", "cpu_send"}
    assert not changes([(r[0], {"send": 0.5 * r[0]["send"]}) for r in rounds])[0]["no_worse"]


def test_instructions_per_mail_is_the_difference_of_two_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up and shut-down cancel out: per mail is (large - small) / (its mails), read from
    valgrind's own summary line (the last one: a child's come first in a shared log)."""
    from loadtest import instructions

    log = tmp_path / "vg.log"
    log.write_text("==1== I   refs:      1,000\n==7== Collected : 9\n==7== I   refs:      2,345,678,901\n")
    assert instructions.instructions(log) == 2_345_678_901
    (tmp_path / "empty.log").write_text("==7== valgrind: failed to start\n")
    with pytest.raises(SystemExit, match="no instruction count"):
        instructions.instructions(tmp_path / "empty.log")

    counts = {1000: 2_000_000_000, 5000: 3_400_000_000}
    monkeypatch.setattr(instructions, "count", lambda tree, case, n, work: counts[n])
    assert instructions.per_mail(tmp_path, "send", tmp_path) == pytest.approx(350_000)
    row = instructions.Row("send", "producer send", [350_000.0], [357_000.0], 1.02, True)
    table = instructions.markdown([row], "aaa", "bbb", 1)
    assert "| producer send | 350.0 k (350.0) | 357.0 k (357.0) | 1.020 | yes |" in table


def test_procstat_reads_this_process() -> None:
    assert (cpu_seconds(os.getpid()) or 0.0) > 0.0
    mem = memory_kb(os.getpid())
    assert mem is not None and 0 < mem[0] <= mem[1]
    assert cpu_seconds(2**22 + 12345) is None


@pytest.mark.timeout(60)
async def test_small_load_test_delivers_every_mail(lt_base: Settings) -> None:
    shared = lt_base.for_test()
    foreign = await _foreign_mail(shared)
    opts = Options(mails=50, producers=1, mode="send", consumers=None, concurrency=10, timeout=45)
    summary, report = await _run(lt_base, opts)

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
    # Nobody watched the [test] tube: it said so, and its own consumer worked on that tube.
    assert f"no consumer watches tube {shared.beanstalkd.tube}: starting 1 consumer" in report, report

    # Only the run's own mails are gone; the foreign one stays.
    assert await _count(shared, {"mail.metadata.loadtest": {"$eq": summary.run_id}}) == 0
    assert await _count(shared, {}) == 1, foreign


@pytest.mark.timeout(60)
async def test_throughput_lines_from_the_config_file_are_shown_and_never_break_a_run(
    lt_base: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``measure_throughput = true`` in the file (which the children read too): the producer
    child's throughput lines must not be taken for its report, and they are shown."""
    config = tmp_path / "mailer.toml"
    config.write_text("measure_throughput = true\nthroughput_interval_s = 0.05\n")
    monkeypatch.setenv("MAILER_CONFIG", str(config))
    monkeypatch.delenv("MAILER_MEASURE_THROUGHPUT", raising=False)
    opts = Options(mails=1000, producers=1, mode="send", consumers=1, concurrency=10, timeout=45)
    summary, report = await _run(lt_base, opts)

    assert summary.ok, report
    assert "Producer PID:" in report and "Consumer PID:" in report, report
    assert " ops / second" in report
    assert {"producer", "consumer"} <= {u.group for u in summary.procs if u.name in summary.throughput}


async def _watching(settings: Settings) -> int:
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as bs:
        return (await tube_stats(bs, b.tube)).get("current-watching", 0)


@pytest.fixture
def two_consumers(lt_base: Settings, tmp_path: Path) -> Iterator[list[ConsumerProcess]]:
    """Two ``mailer.consumer --test`` processes on lt_base's [test] tube, as a user starts them."""
    shared = lt_base.for_test()
    started = [ConsumerProcess(shared, tmp_path / "consumers", concurrency=5) for _ in range(2)]
    yield started
    for c in started:
        c.kill()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_uses_running_consumers_and_says_so(
    lt_base: Settings, two_consumers: list[ConsumerProcess]
) -> None:
    shared = lt_base.for_test()
    tube = shared.beanstalkd.tube
    for c in two_consumers:
        await c.wait_started()
    await wait_until(lambda: _watching(shared), within=20, what="the consumers to watch the tube")
    await wait_until(
        lambda: _watching_at_least(shared, 10), within=20, what="all 10 reserve loops to watch the tube"
    )
    foreign = await _foreign_mail(shared)

    summary, report = await _run(lt_base, Options(mails=200, consumers=None, timeout=60))
    assert summary.ok, report
    assert f"using 2 running consumers on tube {tube}" in report, report
    pids = {c.pid for c in two_consumers}
    consumers = [u for u in summary.procs if u.group == "consumer"]
    assert {u.pid for u in consumers} == pids, report  # theirs, and none of its own
    assert all(not u.own for u in consumers)
    assert await _count(shared, {"mail.metadata.loadtest": {"$eq": summary.run_id}}) == 0
    assert await _count(shared, {}) == 1, foreign

    # --consumers N forces its own, on a private tube so that the running ones take no job.
    summary, report = await _run(lt_base, Options(mails=100, consumers=1, concurrency=5, timeout=60))
    assert summary.ok, report
    assert "starting 1 consumer on a private tube" in report, report
    own = [u for u in summary.procs if u.group == "consumer"]
    assert len(own) == 1 and own[0].own and own[0].pid not in pids
    assert await _count(shared, {}) == 1
    assert all(c.proc.poll() is None for c in two_consumers)  # left running


async def _watching_at_least(settings: Settings, n: int) -> bool:
    return await _watching(settings) >= n


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


# --- make test leaves the checkout clean (issue 14, item 10) ---------------------------------


class _Reporter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(self, title: str) -> None:
        self.lines.append(title)

    def write_line(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.parametrize("flag", [None, "0", "1"])
def test_fault_figures_are_written_only_when_asked(
    flag: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``make test`` prints the fault table but writes nothing tracked; ``make faults`` sets
    MAILER_WRITE_FIGURES=1 and only then are bench/faults.md and .json rewritten."""
    from faults import conftest as faults_conftest
    from faults import harness

    written: list[Path] = []
    monkeypatch.setattr(faults_conftest, "write_bench", lambda rows, directory: written.append(directory))
    row = harness.Row("a scenario", 1, 1, 0, 0, 0, 0.5, 1.0)
    monkeypatch.setattr(faults_conftest, "RESULTS", [row])
    if flag is None:
        monkeypatch.delenv("MAILER_WRITE_FIGURES", raising=False)
    else:
        monkeypatch.setenv("MAILER_WRITE_FIGURES", flag)
    reporter = _Reporter()
    faults_conftest.pytest_terminal_summary(reporter, 0, pytest.Config.__new__(pytest.Config))

    assert any("a scenario" in line for line in reporter.lines)  # the table is always shown
    if flag == "1":
        assert written == [harness.ROOT / "bench"]
    else:
        assert written == []
        assert any("MAILER_WRITE_FIGURES=1" in line for line in reporter.lines), reporter.lines


def test_make_faults_writes_the_figures_and_make_test_does_not() -> None:
    dry = {
        target: subprocess.run(
            ["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout
        for target in ("faults", "test")
    }
    assert "MAILER_WRITE_FIGURES=1" in dry["faults"], dry["faults"]
    assert "MAILER_WRITE_FIGURES" not in dry["test"], dry["test"]
    # make test runs the whole suite, the slow fault scenarios included.
    pytest_line = next(line for line in dry["test"].splitlines() if "bin/pytest" in line)
    assert "-m" not in pytest_line.split() and "slow" not in pytest_line, pytest_line
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "slow" not in str(addopts.get("addopts", ""))


@pytest.mark.parametrize("pytest_status", [1, 5])
def test_ci_fails_when_pytest_fails_or_collects_nothing(pytest_status: int, tmp_path: Path) -> None:
    """``.ci/run`` beside a Makefile whose ``test`` ends as pytest does (1: a failure, 5: no
    test collected) and a stand-in services script: CI fails, and the services are stopped."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "Makefile").write_text(f"test:\n\t@echo make test >> calls; exit {pytest_status}\n")
    services = tmp_path / "scripts" / "services.sh"
    services.write_text('#!/usr/bin/env bash\necho "services $1" >> "$(dirname "$0")/../calls"\n')
    services.chmod(0o755)
    done = subprocess.run([tmp_path / ".ci" / "run"], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0, done
    assert (tmp_path / "calls").read_text().splitlines() == ["make test", "services stop"]
