"""What the fault scenarios share: private servers, consumer processes, producers, counting,
and the figures table.

Every server a scenario kills is its own: beanstalkd and nx-27017 are started here on free
ports with data directories under pytest's tmp dir, never the shared ones on 11300/27017.
Child processes die with the test process (PR_SET_PDEATHSIG) and are killed by the fixtures'
finalizers, so a failed or interrupted scenario leaves nothing running.

Sends are counted on the vendor side, never from MongoDB's own record (which a crash between
the vendor's answer and the write would hide): consumer processes run the simulated vendors
with their per-send log line switched on (``simulated NAME sent mail ID as MSGID``, written
by the vendor the moment it accepts), in-process consumers use FakeVendors, and HTTP
adapters talk to local doubles.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bson import ObjectId
from helpers import wait_until as _wait_until
from pydantic import BaseModel, SecretStr
from pymongo import MongoClient

from mailer.beanstalk import Beanstalk
from mailer.config import Settings
from mailer.errors import EnqueueError, NotFound, StoreError
from mailer.producer import Producer
from mailer.store import MailStore

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN = uuid.uuid4().hex[:6]
T = TypeVar("T")
UNSETTLED = ["queued", "sending", "retrying"]
_SEND_LINE = re.compile(rb"simulated (\S+) sent mail ([0-9a-f]{24}) as ")
_STARTED = re.compile(r"consumer (\S+): tube ")

# A consumer process as `python -m mailer.consumer`, with the simulated vendors' per-send
# DEBUG line enabled (everything else stays at --log-level) so sends can be counted.
_CONSUMER_BOOT = (
    "import logging, sys; "
    "logging.getLogger('mailer.vendors.simulated').setLevel(logging.DEBUG); "
    "from mailer.consumer import main; sys.exit(main(sys.argv[1:]))"
)


# --- small tools ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def wait_until(
    condition: Callable[[], T | Awaitable[T]],
    *,
    within: float,
    interval: float = 0.1,
    what: str = "the condition",
) -> T:
    """``helpers.wait_until`` with a coarser poll: fault scenarios watch slower processes."""
    return await _wait_until(condition, within=within, interval=interval, what=what)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- child processes ----------------------------------------------------------------------------


class Child:
    """One child process with its output in a file (never a pipe that could fill up)."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:  # fmt: skip
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} alive={self.alive}>"

    def spawn(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} at {dt.datetime.now(dt.UTC).isoformat()}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, signum: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``signum`` and wait for the exit (SIGKILL after ``timeout``)."""
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        self.kill(signal.SIGTERM, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


class Processes:
    """Every child a test started, so the finalizer can kill them all (by pid, never by name)."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def kill_all(self) -> None:
        # Consumers first (they would only log errors once the servers are gone).
        for child in sorted(self.children, key=lambda c: not isinstance(c, ConsumerProcess)):
            with contextlib.suppress(Exception):
                child.kill(signal.SIGKILL)


class Beanstalkd(Child):
    """A private beanstalkd with a binlog; restartable on the same port and binlog."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.binlog = workdir / "binlog"
        self.binlog.mkdir(parents=True, exist_ok=True)
        argv = ["beanstalkd", "-l", "127.0.0.1", "-p", str(self.port), "-b", str(self.binlog)]
        super().__init__(f"beanstalkd:{self.port}", argv, workdir / "beanstalkd.log")

    def start_sync(self, timeout: float = 15.0) -> None:
        self.spawn()
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if not self.alive or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")
            time.sleep(0.02)

    async def start(self, within: float = 15.0) -> None:
        self.spawn()
        await wait_until(self._ready, within=within, interval=0.02, what=f"{self.name} to listen")

    def _ready(self) -> bool:
        if not self.alive:
            raise AssertionError(f"{self.name} exited at start:\n{self.tail()}")
        return port_open(self.port)

    def wipe_binlog(self) -> int:
        """Delete the binlog files (the server must be stopped): a lost disk."""
        assert not self.alive
        removed = 0
        for path in self.binlog.iterdir():
            path.unlink()
            removed += 1
        return removed


class Mongo(Child):
    """A private nx-27017 on its own data directory; restartable on the same data."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        exe = BIN / "nx-27017"
        argv = [str(exe), "--data-dir", str(self.data), "--host", "127.0.0.1", "-p", str(self.port),
                "--log-file", str(workdir / "nx.log"), "--pid-file", str(workdir / "nx.pid")]  # fmt: skip
        super().__init__(f"nx-27017:{self.port}", argv, workdir / "nx.out")

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/mailer"

    def ping(self) -> bool:
        if not self.alive:
            raise AssertionError(f"{self.name} exited:\n{self.tail()}")
        if not port_open(self.port):
            return False
        client: MongoClient[dict[str, Any]] = MongoClient(self.uri, serverSelectionTimeoutMS=500)
        try:
            client.admin.command("ping")
            return True
        except Exception:
            return False
        finally:
            client.close()

    def start_sync(self, timeout: float = 30.0) -> None:
        self.spawn()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer ping:\n{self.tail()}")
            time.sleep(0.05)

    async def start(self, within: float = 30.0) -> None:
        self.spawn()
        await wait_until(
            lambda: asyncio.to_thread(self.ping), within=within, interval=0.05, what=f"{self.name} ping"
        )


# --- settings and environments -------------------------------------------------------------------


def scenario_settings(
    base: Settings,
    name: str,
    *,
    beanstalkd_port: int,
    mongo_uri: str,
    ttr_s: int = 120,
    timeout_ms: int = 5000,
    consumer: dict[str, Any] | None = None,
    simulation: dict[str, Any] | None = None,
) -> Settings:
    """Settings on the scenario's own servers, tube and collections."""
    suffix = f"{name}_{RUN}"
    return base.model_copy(
        update={
            "env": "development",
            "measure_throughput": False,
            "beanstalkd": base.beanstalkd.model_copy(
                update={
                    "host": "127.0.0.1",
                    "port": beanstalkd_port,
                    "tube": f"faults_{suffix}",
                    "ttr_s": ttr_s,
                }
            ),
            "mongodb": base.mongodb.model_copy(
                update={
                    "uri": SecretStr(mongo_uri),
                    "database": None,
                    "collection": f"mails_{suffix}",
                    "vendor_status_collection": f"vendors_{suffix}",
                    "timeout_ms": timeout_ms,
                }
            ),
            "consumer": base.consumer.model_copy(
                update={"requeue_interval_s": 0.0, "grace_s": 5.0, **(consumer or {})}
            ),
            # No development outbox: production never builds one, and its writes would load
            # the MongoDB whose faults these scenarios measure.
            "simulation": base.simulation.model_copy(update={"keep_raw": False, **(simulation or {})}),
        }
    )


ScenarioSettings = Callable[..., Settings]  # the make_scenario fixture


def _section_env(prefix: str, section: BaseModel) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in type(section).model_fields:
        value = getattr(section, key)
        if value is None or isinstance(value, BaseModel | list | dict | tuple):
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        out[f"{prefix}__{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def settings_env(settings: Settings, **extra: object) -> dict[str, str]:
    """An environment that gives a child process exactly ``settings`` (no config file, no
    MAILER_* variable of the parent's leaking in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env["MAILER_ENV"] = settings.env
    for name in ("beanstalkd", "mongodb", "consumer", "simulation", "producer"):
        env.update(_section_env(f"MAILER_{name.upper()}", getattr(settings, name)))
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


class ConsumerProcess(Child):
    """``python -m mailer.consumer`` (simulated vendors) on ``settings``; SIGKILL-able."""

    def __init__(self, settings: Settings, workdir: Path, *, concurrency: int, tag: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        n = len(list(workdir.glob("consumer-*.log")))
        name = f"consumer-{n}{tag}"
        (workdir / f"{name}.log").touch()  # claims the name before the process starts
        argv = [sys.executable, "-c", _CONSUMER_BOOT, "--concurrency", str(concurrency)]
        super().__init__(name, argv, workdir / f"{name}.log", env=settings_env(settings), cwd=workdir)
        self.settings = settings
        self.consumer_id: str | None = None

    async def start(self, within: float = 30.0) -> None:
        self.spawn()

        def started() -> str | None:
            if not self.alive:
                raise AssertionError(f"{self.name} exited at start:\n{self.tail()}")
            m = _STARTED.search(self.output())
            return m.group(1) if m else None

        self.consumer_id = await wait_until(started, within=within, interval=0.05, what=f"{self.name} start")

    def sends(self) -> collections.Counter[str]:
        """Vendor-side sends this process made, by mail id (from the simulated vendors' lines)."""
        data = self.log.read_bytes() if self.log.exists() else b""
        return collections.Counter(m.group(2).decode() for m in _SEND_LINE.finditer(data))

    async def terminate(self, within: float = 20.0) -> int | None:
        """SIGTERM and wait (graceful stop); the exit code."""
        if self.alive:
            await asyncio.to_thread(self.stop, within)
        return None if self.proc is None else self.proc.returncode


def total_sends(consumers: Iterable[ConsumerProcess]) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    for c in consumers:
        total.update(c.sends())
    return total


async def run_cli(
    settings: Settings, workdir: Path, *args: str, within: float = 60.0
) -> tuple[int, str, str]:
    """``mailer ARGS`` as operators run it (the console script), on ``settings``."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "mailer"),
        *args,
        env=settings_env(settings),
        cwd=workdir,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# --- producing --------------------------------------------------------------------------------


def mail(i: int, tag: str = "m") -> dict[str, Any]:
    return {
        "from": "Sender <sender@example.com>",
        "to": f"rcpt{i}@example.com",
        "subject": f"{tag} {i}",
        "text": f"fault scenario mail {i}",
        "idempotency_key": f"{tag}-{i}",
    }


@dataclass
class Feeder:
    """One producer (the SDK) sending mails with idempotency keys, as a careful application
    would: a StoreError (nothing stored, or not known to be) is retried with the same keys; an
    EnqueueError means stored but not queued, so it is not retried (the sweep queues it).

    ``accepted`` holds every id the SDK handed back or named as stored; ``errors`` every
    exception it raised, for the check that they were the documented typed ones.
    """

    settings: Settings
    tag: str
    accepted: list[str] = field(default_factory=list)
    stored_unqueued: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def error_types(self) -> collections.Counter[str]:
        return collections.Counter(type(e).__name__ for e in self.errors)

    def unexpected_errors(self) -> list[BaseException]:
        return [e for e in self.errors if not isinstance(e, StoreError | EnqueueError)]

    async def run(self, count: int, *, start: int = 0, batch: int = 10, pause: float = 0.0,
                  single: bool = False, retry_pause: float = 0.25) -> None:  # fmt: skip
        try:
            async with Producer(self.settings) as producer:
                for first in range(start, start + count, batch):
                    mails = [mail(i, self.tag) for i in range(first, min(first + batch, start + count))]
                    if single:
                        await asyncio.gather(*(self._send_one(producer, m, retry_pause) for m in mails))
                    else:
                        await self._send_batch(producer, mails, retry_pause)
                    if pause:
                        await asyncio.sleep(pause)
        finally:
            self.done.set()

    async def _send_one(self, producer: Producer, m: dict[str, Any], retry_pause: float) -> None:
        while True:
            try:
                self.accepted.append(await producer.send(m))
                return
            except EnqueueError as exc:
                self.errors.append(exc)
                self.accepted.extend(exc.mail_ids)
                self.stored_unqueued.extend(exc.mail_ids)
                return
            except StoreError as exc:
                self.errors.append(exc)
                await asyncio.sleep(retry_pause)
            except Exception as exc:  # recorded; the test fails on it
                self.errors.append(exc)
                return

    async def _send_batch(self, producer: Producer, mails: list[dict[str, Any]], retry_pause: float) -> None:
        while True:
            try:
                self.accepted.extend(await producer.send_many(mails))
                return
            except EnqueueError as exc:
                # Every mail of the batch is stored; those in mail_ids are not queued yet.
                self.errors.append(exc)
                self.accepted.extend(exc.all_ids)
                self.stored_unqueued.extend(exc.mail_ids)
                return
            except StoreError as exc:
                self.errors.append(exc)
                await asyncio.sleep(retry_pause)
            except Exception as exc:
                self.errors.append(exc)
                return


def all_accepted(*feeders: Feeder) -> list[str]:
    return list(dict.fromkeys(i for f in feeders for i in f.accepted))


# --- counting -----------------------------------------------------------------------------------


async def unsettled(store: MailStore) -> int:
    return await store.mails.count_documents({"status": {"$in": UNSETTLED}})


async def wait_settled(
    store: MailStore, expected_docs: int, *, within: float, what: str = "", ids: Sequence[str] | None = None
) -> float:
    """Until at least ``expected_docs`` mails are stored and none is queued/sending/retrying
    (of ``ids`` only, when given); the monotonic time it happened."""
    oids = None if ids is None else [ObjectId(i) for i in ids]

    async def settled() -> bool:
        if oids is not None:
            # find, not count_documents: nx-27017 counts nothing on ObjectId values.
            found = [d async for d in store.mails.find({"_id": {"$in": oids}}, {"status": 1})]
            return len(found) >= expected_docs and all(d.get("status") not in UNSETTLED for d in found)
        total = await store.mails.count_documents({})
        return total >= expected_docs and await unsettled(store) == 0

    try:
        await wait_until(settled, within=within, interval=0.1, what=what or "every mail to settle")
    except AssertionError:
        counts = await store.status_counts()
        raise AssertionError(f"mails did not settle within {within:.0f} s: {counts} {what}") from None
    return time.monotonic()


async def tube_counts(settings: Settings) -> dict[str, int]:
    b = settings.beanstalkd
    keys = ("ready", "reserved", "delayed", "buried")
    async with Beanstalk(b.host, b.port) as bs:
        try:
            stats = await bs.stats_tube(b.tube)
        except NotFound:
            return dict.fromkeys(keys, 0)
    return {k: int(stats[f"current-jobs-{k}"]) for k in keys}


@dataclass
class Tally:
    accepted: int = 0
    sent_once: int = 0
    sent_twice: int = 0
    failed: int = 0
    lost: int = 0
    stored_not_accepted: int = 0
    problems: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


async def tally(
    store: MailStore,
    accepted: Iterable[str],
    sends: collections.Counter[str],
    *,
    window: set[str] | None = None,
) -> Tally:
    """Every accepted mail must be stored and either ``sent`` by exactly one vendor send or
    ``failed`` with a reason; anything else is lost. Mails sent more than once are counted
    in ``sent_twice`` (and listed as a problem unless in the documented ``window``)."""
    ids = list(dict.fromkeys(accepted))
    docs = {str(d["_id"]): d async for d in store.mails.find({}, {"status": 1, "error": 1})}
    t = Tally(accepted=len(ids))
    t.statuses = dict(collections.Counter(str(d.get("status")) for d in docs.values()))
    wanted = set(ids)
    t.stored_not_accepted = sum(1 for i in docs if i not in wanted)
    for mail_id in ids:
        doc = docs.get(mail_id)
        n = sends.get(mail_id, 0)
        if n > 1:
            t.sent_twice += 1
            if window is None or mail_id not in window:
                t.problem(f"{mail_id}: sent {n} times")
        if doc is None:
            t.lost += 1
            t.problem(f"{mail_id}: accepted but missing from MongoDB")
        elif doc.get("status") == "sent":
            if n == 0:
                t.lost += 1
                t.problem(f"{mail_id}: recorded sent but no vendor send was seen")
            elif n == 1:
                t.sent_once += 1
        elif doc.get("status") == "failed" and doc.get("error"):
            t.failed += 1
            if n:
                t.problem(f"{mail_id}: failed but a vendor accepted it {n} time(s)")
        else:
            t.lost += 1
            t.problem(f"{mail_id}: left {doc.get('status')!r} (error {doc.get('error')!r})")
    for mail_id, n in sends.items():
        if mail_id not in wanted and mail_id not in docs:
            t.problem(f"{mail_id}: sent {n} time(s) but not stored")
    return t


# --- the figures table --------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    accepted: int
    sent_once: int
    sent_twice: int
    failed: int
    lost: int
    recover_s: float | None
    total_s: float
    notes: str = ""
    passed: bool = True
    measured_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))


RESULTS: list[Row] = []
HEADERS = (
    "scenario",
    "accepted",
    "sent once",
    "sent twice",
    "failed",
    "lost",
    "recover (s)",
    "total (s)",
    "notes",
)


def record(scenario: str, t: Tally, *, recover_s: float | None, total_s: float, notes: str = "") -> Row:
    ok = t.lost == 0 and not t.problems
    row = Row(scenario, t.accepted, t.sent_once, t.sent_twice, t.failed, t.lost,
              None if recover_s is None else round(recover_s, 1), round(total_s, 1), notes, ok)  # fmt: skip
    RESULTS[:] = [r for r in RESULTS if r.scenario != scenario] + [row]
    return row


def assert_clean(t: Tally, *, allowed_twice: int = 0) -> None:
    assert t.lost == 0, f"{t.lost} mail(s) lost: {t.problems}"
    assert t.sent_twice <= allowed_twice, f"{t.sent_twice} mail(s) sent twice: {t.problems}"
    assert not t.problems, t.problems


def _cells(row: Row) -> list[str]:
    recover = "—" if row.recover_s is None else f"{row.recover_s:.1f}"
    return [row.scenario, str(row.accepted), str(row.sent_once), str(row.sent_twice), str(row.failed),
            str(row.lost), recover, f"{row.total_s:.1f}", row.notes]  # fmt: skip


def render_text(rows: Sequence[Row]) -> str:
    """A plain table for the terminal (notes last, unpadded)."""
    body = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(HEADERS[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS[:-1], widths, strict=True)) + "  notes"]
    for cells, row in zip(body, rows, strict=True):
        flag = "" if row.passed else "  [FAILED]"
        padded = "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths, strict=True))
        lines.append(f"{padded}  {cells[-1]}{flag}")
    return "\n".join(lines)


def render_markdown(rows: Sequence[Row]) -> str:
    whens = sorted({r.measured_at for r in rows})
    when = whens[0] if len(whens) == 1 else f"{whens[0]} to {whens[-1]} (a row per scenario's latest run)"
    out = [
        "# Fault scenarios: figures",
        "",
        f"Measured by `make faults` (`pytest tests/faults -m slow`) on {when}, {os.cpu_count()} cores, "
        "each scenario on its own beanstalkd (and, where MongoDB is stopped, its own nx-27017).",
        "",
        "- **accepted**: mails the producer SDK returned an id for (or named as stored in an EnqueueError).",
        "- **sent once / sent twice**: counted on the vendor side (the simulated vendors' per-send log "
        "line in each consumer process, FakeVendor records, HTTP doubles), not from MongoDB.",
        "- **failed**: status `failed` with a reason. **lost**: accepted but missing from MongoDB, or left "
        "queued/sending/retrying, or recorded `sent` with no vendor send.",
        "- **recover**: from the end of the fault (restart, vendors back) to every mail settled; for "
        "scenarios whose fault does not end (a hung vendor, poison jobs, plain concurrency) it is "
        "the time from the first mail to every mail settled. **total**: the scenario's wall time.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" if i in (0, len(HEADERS) - 1) else "---:" for i in range(len(HEADERS))) + "|",
    ]
    for row in rows:
        cells = _cells(row)
        if not row.passed:
            cells[-1] = (cells[-1] + " **(check failed)**").strip()
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(out) + "\n"


def merged(rows: Sequence[Row], path: Path) -> list[Row]:
    """This session's rows over those already in ``path``: running one scenario alone updates
    its row and keeps the others' (each row says when it was measured)."""
    try:
        previous = [Row(**r) for r in json.loads(path.read_text(encoding="utf-8"))["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        previous = []
    fresh = {r.scenario: r for r in rows}
    out = [fresh.pop(r.scenario, r) for r in previous]
    return out + [r for r in rows if r.scenario in fresh]


def write_bench(rows: Sequence[Row], directory: Path) -> list[Row]:
    directory.mkdir(parents=True, exist_ok=True)
    table = merged(rows, directory / "faults.json")
    (directory / "faults.md").write_text(render_markdown(table), encoding="utf-8")
    data = {"cpus": os.cpu_count(), "rows": [asdict(r) for r in table]}
    (directory / "faults.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return table


# --- issue 15, part 2 (slow vendors, tests/faults/test_slow_vendors.py): consumers on real HTTP
# adapters, signals that do not wait, settling that reports instead of raising ----------------


def vendor_env(sections: dict[str, BaseModel]) -> dict[str, str]:
    """MAILER_* variables that enable exactly these ``[vendors.NAME]`` sections, in this order."""
    env = {"MAILER_VENDORS__ORDER": json.dumps(list(sections))}
    for name, section in sections.items():
        env.update(_section_env(f"MAILER_VENDORS__{name.upper()}", section))
    return env


class HttpConsumerProcess(ConsumerProcess):
    """``python -m mailer.consumer`` with ``MAILER_ENV=production``: the real HTTP adapters,
    pointed by ``vendors`` at local doubles, so vendor latency and timeouts are real. Sends are
    counted by the doubles (this process writes no simulated send lines)."""

    def __init__(self, settings: Settings, workdir: Path, *, concurrency: int,
                 vendors: dict[str, BaseModel], tag: str = "") -> None:  # fmt: skip
        production = settings.model_copy(update={"env": "production"})
        super().__init__(production, workdir, concurrency=concurrency, tag=tag)
        assert self.env is not None
        self.env.update(vendor_env(vendors))

    def post_signal(self, signum: int) -> None:
        """Send ``signum`` and return at once (SIGTERM mid-delivery, SIGSTOP, SIGCONT)."""
        assert self.proc is not None and self.alive, f"{self.name} is not running"
        self.proc.send_signal(signum)

    async def exited(self, within: float) -> int:
        """The exit code, once the process has ended by itself within ``within`` seconds."""
        await wait_until(lambda: not self.alive, within=within, what=f"{self.name} to exit")
        assert self.proc is not None and self.proc.returncode is not None
        return self.proc.returncode


async def settled_within(
    store: MailStore, expected_docs: int, *, within: float, what: str = ""
) -> float | None:
    """``wait_settled``, but None instead of an error: the scenario still tallies and records
    what it saw before its assertions fail."""
    try:
        return await wait_settled(store, expected_docs, within=within, what=what)
    except AssertionError:
        return None


# --- part D1: full disks, frozen servers, repeated consumer kills --------------------------------


class Tmpfs:
    """A small tmpfs mounted on ``path``: a disk a scenario can fill and free at will.

    Root only (``mount -t tmpfs``); the caller turns a refused mount into a skip. The filler
    is one file topped up until ENOSPC, so the server on the disk sees a real full disk
    (its own writes fail), not a simulated error."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.size_mb = size_mb
        self.filler = path / "filler.bin"
        self.mounted = False

    def __repr__(self) -> str:
        return f"<Tmpfs {self.path} {self.size_mb} MB mounted={self.mounted}>"

    def mount(self) -> None:
        """Raises OSError (or CalledProcessError) when mounting is not permitted here."""
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
            timeout=10,
        )
        self.mounted = True

    def unmount(self) -> None:
        """Lazy when busy: a server still holding files open must not leave the mount behind."""
        if not self.mounted:
            return
        done = subprocess.run(["umount", str(self.path)], capture_output=True, timeout=10)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=10)
        self.mounted = False

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> int:
        """Top the filler up until the disk refuses even a byte; the bytes added. Called again
        while a fault lasts, because a server may free space meanwhile (beanstalkd deletes a
        binlog file once all its jobs are gone)."""
        added = 0
        with self.filler.open("ab", buffering=0) as out:
            for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        added += out.write(block) or 0
                    except OSError:
                        break
        return added

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


async def hold_full(disk: Tmpfs, seconds: float, *, every: float = 0.1) -> None:
    """Keep ``disk`` full for ``seconds`` (the first fill is the caller's)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.to_thread(disk.fill)
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))


class frozen:
    """SIGSTOP a child (its whole process group) for the ``with`` block: a server that hangs
    with its sockets open, unlike a dead one. SIGCONT on the way out even when the block fails."""

    def __init__(self, child: Child) -> None:
        self.child = child

    def __enter__(self) -> None:
        assert self.child.alive and self.child.pid is not None, f"{self.child.name} is not running"
        os.killpg(self.child.pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        if self.child.alive and self.child.pid is not None:
            os.killpg(self.child.pid, signal.SIGCONT)


async def crash_window(store: MailStore, killed: ConsumerProcess) -> set[str]:
    """Mails the killed consumer's vendors accepted that MongoDB does not record as sent by it:
    the documented duplicate window (a crash between the vendor's acceptance and the record).
    Call it right after the kill, before any lease of the dead consumer can run out."""
    sent = list(killed.sends())
    if not sent:
        return set()
    found = store.mails.find({"_id": {"$in": [ObjectId(i) for i in sent]}}, {"status": 1, "consumer": 1})
    recorded = {
        str(d["_id"])
        async for d in found
        if d.get("status") == "sent" and d.get("consumer") == killed.consumer_id
    }
    return set(sent) - recorded


async def tube_drained(settings: Settings) -> bool:
    """No job left to run (ready, reserved or delayed); buried ones are the scenario's to judge."""
    counts = await tube_counts(settings)
    return counts["ready"] + counts["reserved"] + counts["delayed"] == 0
