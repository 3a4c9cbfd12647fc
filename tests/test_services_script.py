"""``scripts/services.sh``: a server that cannot start says why, in its own words.

The servers are stand-ins on free ports in a scratch data folder, so these tests never touch
the session's real beanstalkd and nx-27017.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "services.sh"

# Listens on the port given after -p until stopped: a server that started.
LISTENS = f"""#!/usr/bin/env bash
while [ $# -gt 0 ]; do [ "$1" = -p ] && port=$2; shift; done
exec {sys.executable} -c "import socket, sys, time
s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(120)" "$port"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def exits_saying(words: str) -> str:
    return f'#!/usr/bin/env bash\necho "{words}" >&2\nexit 3\n'


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    values = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "VENV": str(tmp_path / "venv"),
        "MAILER_DATA_DIR": str(tmp_path / "data"),
        "MAILER_BEANSTALKD_PORT": str(free_port()),
        "MAILER_MONGO_PORT": str(free_port()),
    }
    yield values
    subprocess.run([SCRIPT, "stop"], env=values, capture_output=True, timeout=30)


def services(env: dict[str, str], command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, command], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("server", "binary", "listening"),
    [("beanstalkd", "bin/beanstalkd", ()), ("nx-27017", "venv/bin/nx-27017", ("bin/beanstalkd",))],
)
def test_a_server_that_exits_at_start_shows_its_own_output(
    tmp_path: Path, env: dict[str, str], server: str, binary: str, listening: tuple[str, ...]
) -> None:
    for other in listening:  # the servers started before this one
        fake(tmp_path / other, LISTENS)
    fake(tmp_path / binary, exits_saying(f"{server}: data folder is locked"))
    done = services(env, "start")
    assert done.returncode != 0
    assert f"{server} exited at start" in done.stderr
    assert f"{server}: data folder is locked" in done.stderr


def test_a_missing_venv_names_the_command_that_creates_it(tmp_path: Path, env: dict[str, str]) -> None:
    fake(tmp_path / "bin" / "beanstalkd", LISTENS)
    done = services(env, "start")
    assert done.returncode != 0
    assert "nx-27017 is not installed" in done.stderr
    assert "make services" in done.stderr
    assert not (tmp_path / "data" / "mongo.pid").exists()  # nothing half-started to clean up
