"""Fixtures of the fault scenarios: private servers and child processes, always killed.

Nothing here touches the shared beanstalkd (11300) or nx-27017 (27017): every scenario gets
a beanstalkd of its own, and MongoDB is a private nx-27017 for the session (a scenario that
stops MongoDB starts yet another of its own). The figures table is printed at the end of the
session; it is written to the tracked bench/faults.md and bench/faults.json only with
MAILER_WRITE_FIGURES=1 (``make faults`` sets it), so that ``make test`` leaves the checkout
as it found it instead of committing this machine's figures by accident.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailer.config import Settings, load_settings

from .harness import (
    RESULTS,
    ROOT,
    Beanstalkd,
    Mongo,
    Processes,
    ScenarioSettings,
    render_text,
    scenario_settings,
    write_bench,
)


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Children started by the test; all SIGKILLed afterwards, whatever happened."""
    group = Processes()
    yield group
    group.kill_all()


@pytest.fixture(scope="session")
def fault_base() -> Settings:
    """Defaults plus the developer's config, before each scenario points it at its own servers."""
    os.environ.pop("MAILER_ENV", None)
    return load_settings(test=False)


@pytest.fixture(scope="session")
def session_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mongo]:
    """A private nx-27017 for the scenarios that do not stop MongoDB."""
    mongo = Mongo(tmp_path_factory.mktemp("faults-mongo"))
    mongo.start_sync()
    try:
        yield mongo
    finally:
        mongo.stop(timeout=5)


@pytest.fixture
def beanstalkd(procs: Processes, tmp_path: Path) -> Beanstalkd:
    """A private beanstalkd with a binlog, for this test only."""
    server = Beanstalkd(tmp_path / "beanstalkd")
    procs.add(server)
    server.start_sync()
    return server


@pytest.fixture
def make_scenario(fault_base: Settings, session_mongo: Mongo, beanstalkd: Beanstalkd) -> ScenarioSettings:
    """``make_scenario(name, ttr_s=..., consumer={...}, simulation={...}, mongo_uri=...)``."""

    def make(name: str, **kwargs: Any) -> Settings:
        kwargs.setdefault("mongo_uri", session_mongo.uri)
        return scenario_settings(fault_base, name, beanstalkd_port=beanstalkd.port, **kwargs)

    return make


WRITE_FIGURES = "MAILER_WRITE_FIGURES"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not RESULTS:
        return
    terminalreporter.section("fault scenarios: figures")
    terminalreporter.write_line(render_text(RESULTS))
    bench = ROOT / "bench"
    if os.environ.get(WRITE_FIGURES) != "1":
        terminalreporter.write_line(
            f"not written to {bench / 'faults.md'}: run 'make faults' (it sets {WRITE_FIGURES}=1) for that"
        )
        return
    try:
        write_bench(RESULTS, bench)
    except OSError as exc:
        terminalreporter.write_line(f"(could not write {bench}/faults.md: {exc})")
    else:
        terminalreporter.write_line(f"written to {bench / 'faults.md'} and {bench / 'faults.json'}")
