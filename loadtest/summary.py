"""What a load test reports, computed from MongoDB and /proc after the run, and its table.

Latency is read from the stored documents (``created_at`` written by the producer,
``sent_at`` by the consumer's final update), not timed by the load test, so it is what
the mails themselves saw, whatever the polling interval of the live display.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtest.procstat import Usage


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of sorted ``values``; NaN when empty."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


@dataclass(slots=True)
class Delivered:
    """The run's mails as MongoDB has them at the end."""

    sent: int = 0
    failed: int = 0
    other: int = 0
    latencies_s: list[float] = field(default_factory=list)  # sorted
    last_sent: float = 0.0  # epoch of the latest sent_at
    last_mail_lag_s: float = math.nan  # the newest mail: created_at -> sent_at

    @classmethod
    def from_docs(cls, docs: Iterable[dict[str, Any]]) -> Delivered:
        out = cls()
        newest: tuple[dt.datetime, float] | None = None
        for doc in docs:
            status = doc.get("status")
            created, sent_at = doc.get("created_at"), doc.get("sent_at")
            if status == "sent" and isinstance(created, dt.datetime) and isinstance(sent_at, dt.datetime):
                out.sent += 1
                lag = (sent_at - created).total_seconds()
                out.latencies_s.append(lag)
                out.last_sent = max(out.last_sent, sent_at.timestamp())
                if newest is None or created > newest[0]:
                    newest = (created, lag)
            elif status == "failed":
                out.failed += 1
            else:
                out.other += 1
        out.latencies_s.sort()
        if newest is not None:
            out.last_mail_lag_s = newest[1]
        return out


@dataclass(slots=True)
class Summary:
    requested: int
    run_id: str = ""
    produced: int = 0
    produce_errors: int = 0
    first_error: str | None = None
    queued: int = 0  # jobs put on the tube, by its counters
    delivered: Delivered = field(default_factory=Delivered)
    producer_rate: float = 0.0  # mails/s from the first producer's start to the last one's end
    e2e_rate: float = 0.0  # delivered mails/s from the start signal to the last sent_at
    wall_s: float = 0.0
    timed_out: bool = False
    problem: str | None = None
    procs: list[Usage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # whose consumers, which tube
    throughput: dict[str, list[float]] = field(default_factory=dict)  # child -> its lines' ops/s

    @property
    def ok(self) -> bool:
        return (
            not self.timed_out
            and self.problem is None
            and self.produce_errors == 0
            and self.delivered.sent == self.requested
        )

    def cpu_per_1000(self, cpu_s: float, group: str) -> float:
        """Producers per mail produced, consumers per mail delivered, servers per mail requested."""
        n = {"producer": self.produced or self.queued, "consumer": self.delivered.sent}.get(
            group, self.requested
        )
        return cpu_s / max(1, n) * 1000

    def render(self, console: Console) -> None:
        console.print(self._main_table())
        console.print(self._process_table())
        if self.throughput:
            console.print(self._throughput_table())
        for note in self.notes:
            console.print(note, markup=False, highlight=False, soft_wrap=True)
        if self.first_error:
            console.print(f"[red]first producer error:[/] {self.first_error}")
        if self.problem:
            console.print(f"[red]{self.problem}[/]")
        verdict = "[green]all mails delivered[/]" if self.ok else "[red]NOT all mails delivered[/]"
        console.print(f"{verdict}: {self.delivered.sent:,} of {self.requested:,} in {self.wall_s:.1f} s")

    def _main_table(self) -> Table:
        d = self.delivered
        t = Table(title="Load test summary", show_header=False)
        t.add_column(style="bold")
        t.add_column(justify="right")
        ms = [percentile(d.latencies_s, q) * 1000 for q in (50, 95, 99, 100)]
        rows = [
            ("mails requested / queued", f"{self.requested:,} / {self.queued:,}"),
            ("delivered (sent) / failed / unfinished", f"{d.sent:,} / {d.failed:,} / {d.other:,}"),
            ("producer mails/s", f"{self.producer_rate:,.0f}"),
            ("end-to-end delivered mails/s", f"{self.e2e_rate:,.0f}"),
            ("latency created->sent p50 / p95 / p99", " / ".join(f"{v:,.0f} ms" for v in ms[:3])),
            ("latency max", f"{ms[3]:,.0f} ms"),
            ("newest mail: created->sent", f"{d.last_mail_lag_s * 1000:,.0f} ms"),
        ]
        for key, value in rows:
            t.add_row(key, value)
        return t

    def _process_table(self) -> Table:
        t = Table(title="Processes (CPU over the measured window; peak RSS)")
        for name in ("process", "pid", "CPU s", "CPU s / 1,000 mails", "peak RSS MB"):
            t.add_column(name, justify="left" if name == "process" else "right")
        for u in self.procs:
            per_1000 = self.cpu_per_1000(u.cpu_s, u.group)
            t.add_row(u.name, str(u.pid), f"{u.cpu_s:.2f}", f"{per_1000:.3f}", _mb(u.peak_rss_kb))
        for group in ("producer", "consumer"):
            members = [u for u in self.procs if u.group == group]
            if len(members) > 1:
                cpu = sum(u.cpu_s for u in members)
                t.add_row(f"all {group}s", "", f"{cpu:.2f}", f"{self.cpu_per_1000(cpu, group):.3f}", "")
        return t

    def _throughput_table(self) -> Table:
        """The children's own ``Throughput:`` lines (``measure_throughput``), beside the
        figures above: the peak is the best interval, the mean that of the busy ones."""
        t = Table(title="Throughput lines of the children (measure_throughput)")
        for name in ("process", "lines", "peak ops/s", "mean ops/s while busy"):
            t.add_column(name, justify="left" if name == "process" else "right")
        for child, rates in sorted(self.throughput.items()):
            busy = [r for r in rates if r > 0]
            mean = sum(busy) / len(busy) if busy else 0.0
            t.add_row(child, str(len(rates)), f"{max(rates):,.1f}", f"{mean:,.1f}")
        return t


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"
