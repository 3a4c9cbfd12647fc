"""deploy/: the systemd units pass ``systemd-analyze verify``, and deploy/supervisord.conf runs
2 consumers on the local services that deliver 500 mails, each once, and stop cleanly."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, MakeSettings, docs, free_port, mail, wait_all_status, wait_until

from mailer.config import Settings
from mailer.producer import Producer
from mailer.store import MailStore

DEPLOY = ROOT / "deploy"
VENV_BIN = ROOT / ".venv" / "bin"
UNITS = ("mailer-api.service", "mailer-consumer@.service")


def test_systemd_units_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    for name in UNITS:  # the units name /opt/mailer; verify checks that ExecStart exists
        text = (DEPLOY / "systemd" / name).read_text().replace("/opt/mailer", str(ROOT))
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [exe, "verify", *(str(tmp_path / n) for n in UNITS)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for an unknown key (it only warns): any output at all is a finding.
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done


def test_units_stop_gracefully_and_are_hardened() -> None:
    for name in UNITS:
        lines = set((DEPLOY / "systemd" / name).read_text().splitlines())
        for wanted in ("Restart=on-failure", "KillSignal=SIGTERM", "NoNewPrivileges=yes", "User=mailer"):
            assert wanted in lines, (name, wanted)
        assert "ProtectSystem=strict" in lines and any(x.startswith("ReadWritePaths=") for x in lines)
        stop = next(int(x.split("=")[1]) for x in lines if x.startswith("TimeoutStopSec="))
        assert stop > Settings().consumer.grace_s + 30, "longer than the grace plus a vendor's timeout"


def _env(settings: Settings, run_dir: Path) -> dict[str, str]:
    b, m = settings.beanstalkd, settings.mongodb
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(
        {
            "MAILER_RUN_DIR": str(run_dir),
            "MAILER_CONSUMERS": "2",
            "MAILER_CONSUMER__CONCURRENCY": "10",
            "MAILER_BEANSTALKD__HOST": b.host,
            "MAILER_BEANSTALKD__PORT": str(b.port),
            "MAILER_BEANSTALKD__TUBE": b.tube,
            "MAILER_MONGODB__URI": m.uri.get_secret_value(),
            "MAILER_MONGODB__COLLECTION": m.collection,
            "MAILER_MONGODB__VENDOR_STATUS_COLLECTION": m.vendor_status_collection,
            "MAILER_API__PORT": str(free_port()),
        }
    )
    return env


class Supervisor:
    """deploy/supervisord.conf as an operator runs it; shut down (bounded) at the end."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.conf = str(DEPLOY / "supervisord.conf")

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [str(VENV_BIN / "supervisorctl"), "-c", self.conf, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.stdout + done.stderr

    def start(self) -> None:
        subprocess.run([str(VENV_BIN / "supervisord"), "-c", self.conf], env=self.env, check=True, timeout=30)

    def shutdown(self) -> None:
        self.ctl("shutdown")
        pid_file = Path(self.env["MAILER_RUN_DIR"]) / "supervisord.pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists():
                return
            subprocess.run(["sleep", "0.05"], check=False)
        os.kill(pid, 9)


@pytest.fixture
def supervisor_env(tmp_path: Path) -> Iterator[Path]:
    if not (VENV_BIN / "supervisord").exists():
        pytest.skip("supervisor is not installed: .venv/bin/pip install supervisor")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    yield run_dir


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_supervisord_runs_2_consumers_that_deliver_500_mails_once(
    make_settings: MakeSettings, supervisor_env: Path
) -> None:
    settings = await make_settings()
    sup = Supervisor(_env(settings, supervisor_env))
    sup.start()
    try:

        def both_running() -> bool:
            status = sup.ctl("status")
            return status.count("mailer-consumer:mailer-consumer-") == 2 and status.count("RUNNING") >= 2

        await wait_until(lambda: asyncio.to_thread(both_running), within=30, what="2 consumers RUNNING")
        async with Producer(settings) as producer:
            ids = await producer.send_many([mail(i) for i in range(500)])
        async with MailStore(settings) as store:
            await wait_all_status(store, ids, "sent", within=90)
            found = await docs(store, ids, {"attempts": 1, "consumer": 1})
        stopped = await asyncio.to_thread(sup.ctl, "stop", "mailer-consumer:*")
        status = await asyncio.to_thread(sup.ctl, "status", "mailer-consumer:*")
    finally:
        await asyncio.to_thread(sup.shutdown)
    sends = collections.Counter(
        i for i, d in found.items() for a in d.get("attempts") or [] if a.get("outcome") == "sent"
    )
    assert len(sends) == 500 and set(sends.values()) == {1}
    assert len({d["consumer"] for d in found.values()}) == 2, "both consumers delivered"
    assert stopped.count("stopped") == 2, stopped
    assert status.count("STOPPED") == 2, status
    logs = [supervisor_env / f"mailer-consumer-{n}.log" for n in range(2)]
    assert all("consumer stopped after" in p.read_text() for p in logs)
