"""CPU time and memory of processes, read from /proc (Linux only).

Why /proc rather than ``resource``: the servers (beanstalkd, nx-27017) and the consumers
are not our children in a way ``getrusage`` could see while they run, and each one's CPU
must be attributed separately. ``utime + stime`` in /proc/PID/stat covers every thread of
the process (pymongo's monitor threads included).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
from collections import Counter
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


# --- which local processes are consumers of a tube ----------------------------------------
#
# beanstalkd's ``stats-tube`` says how many connections watch a tube (``current-watching``)
# but not whose, and a consumer holds one watching connection per reserve loop, so that
# number counts loops, not consumers. The load test runs on the services' machine (it reads
# their CPU here too), so it maps connections to processes the way ``ss -p`` does: every
# established TCP connection to beanstalkd's port in /proc/net/tcp{,6} has a socket inode,
# and /proc/PID/fd links name the inodes each process holds. A process counts as a consumer
# of the [test] tube when its command line is ``mailer-consumer --test`` (or ``python -m
# mailer.consumer --test``) and its environment does not point --test at another tube.

_ESTABLISHED = "01"


def _address(hex_addr: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:2C1C`` (/proc/net/tcp's little-endian words) -> (127.0.0.1, 11340)."""
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    # Each 32-bit word is in host byte order (little-endian on the machines this runs on).
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, int(port, 16)
    return ip, int(port, 16)


def _socket_inodes_to(host: str, port: int) -> set[str]:
    """Inodes of the established client sockets connected to ``host:port``."""
    try:
        wanted = {ipaddress.ip_address(a[4][0]) for a in socket.getaddrinfo(host, port, proto=6)}
    except (OSError, ValueError):
        return set()
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != _ESTABLISHED:
                continue
            ip, rport = _address(f[2])
            if rport == port and ip in wanted:
                inodes.add(f[9])
    return inodes


def connections_to(host: str, port: int) -> Counter[int]:
    """How many established connections to ``host:port`` each local process holds, by pid."""
    inodes = {f"socket:[{i}]" for i in _socket_inodes_to(host, port)}
    held: Counter[int] = Counter()
    if not inodes:
        return held
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        if n := sum(1 for link in _fd_links(proc) if link in inodes):
            held[int(proc.name)] = n
    return held


def _fd_links(proc: Path) -> list[str]:
    """What the process's descriptors point at; fds closed meanwhile are skipped."""
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return []  # gone, or not ours to read
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return links


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def is_test_consumer(argv: list[str], environ: dict[str, str], tube: str) -> bool:
    """``mailer-consumer --test`` (or ``-m mailer.consumer --test``) on ``tube``."""
    script = any(Path(a).name == "mailer-consumer" for a in argv[:2])
    module = any(a == "-m" and b == "mailer.consumer" for a, b in itertools.pairwise(argv))
    if not (script or module) or "--test" not in argv:
        return False
    return environ.get("MAILER_TEST__TUBE", tube) == tube


def consumers_of_test_tube(host: str, port: int, tube: str) -> dict[int, int]:
    """Local consumer processes of ``tube`` connected to beanstalkd: pid -> connections."""
    return {
        pid: n
        for pid, n in sorted(connections_to(host, port).items())
        if is_test_consumer(_argv(pid), _environ(pid), tube)
    }


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
