"""CPU time and memory of processes, read from /proc (Linux only).

Why /proc rather than ``resource``: the servers (beanstalkd, nx-27017) and the consumers
are not our children in a way ``getrusage`` could see while they run, and each one's CPU
must be attributed separately. ``utime + stime`` in /proc/PID/stat covers every thread of
the process (pymongo's monitor threads included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
DATA_DIR = Path(os.environ.get("MAILER_DATA_DIR") or Path(__file__).resolve().parents[1] / ".data")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kb(pid: int) -> tuple[int, int] | None:
    """``(VmRSS, VmHWM)`` in KiB, or None when the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    values = {"VmRSS:": 0, "VmHWM:": 0}
    for line in lines:
        parts = line.split()  # "VmRSS:\t   12080 kB"
        if len(parts) >= 2 and parts[0] in values:
            values[parts[0]] = int(parts[1])
    return values["VmRSS:"], values["VmHWM:"]


def server_pids() -> dict[str, int]:
    """The running local servers by name, from the pid files ``scripts/services.sh`` writes."""
    out: dict[str, int] = {}
    for name, file in (("beanstalkd", "beanstalkd.pid"), ("nx-27017", "mongo.pid")):
        try:
            pid = int((DATA_DIR / file).read_text().strip())
        except (OSError, ValueError):
            continue
        if cpu_seconds(pid) is not None:
            out[name] = pid
    return out


@dataclass(slots=True)
class Usage:
    """One process over one measured window."""

    name: str
    pid: int
    group: str  # "producer", "consumer", "server" or "loadtest"
    own: bool  # started by us: its VmHWM is its own peak; a server's HWM predates the run
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    peak_rss_kb: int = 0

    @property
    def cpu_s(self) -> float:
        return max(0.0, self.cpu_end - self.cpu_start)


class ProcWatch:
    """Tracks a set of processes: CPU between ``start()`` and ``stop()``, peak RSS throughout."""

    def __init__(self) -> None:
        self.procs: dict[str, Usage] = {}
        self._stopped = False

    def add(self, name: str, pid: int, group: str, *, own: bool = True) -> None:
        usage = Usage(name, pid, group, own)
        usage.cpu_start = usage.cpu_end = cpu_seconds(pid) or 0.0
        self.procs[name] = usage
        self.sample()

    def start(self) -> None:
        """Begin the measured window (after start-up, so imports and connects do not count)."""
        self._stopped = False
        for usage in self.procs.values():
            usage.cpu_start = usage.cpu_end = cpu_seconds(usage.pid) or usage.cpu_end

    def sample(self) -> None:
        """Record the latest CPU reading and RSS of every live process (cheap: two small reads each)."""
        if self._stopped:
            return
        for usage in self.procs.values():
            cpu = cpu_seconds(usage.pid)
            mem = memory_kb(usage.pid)
            if cpu is None or mem is None:
                continue  # gone: keep the last readings
            usage.cpu_end = cpu
            rss, hwm = mem
            usage.peak_rss_kb = max(usage.peak_rss_kb, hwm if usage.own else rss)

    def stop(self) -> None:
        """End the measured window: later samples (during clean-up) change nothing."""
        self.sample()
        self._stopped = True

    def group_cpu(self, group: str) -> float:
        return sum(u.cpu_s for u in self.procs.values() if u.group == group)
