"""The benchmark's rows, their targets, and the JSON and Markdown they are written to.

A row's ratio is taken per run (value / baseline of that same run) before the median, so a
slow moment of the machine that hits both the row and its baseline cancels out. Every target
is such a ratio: an absolute one (``<= 400 us``) fails on a slower machine while the same-run
ratio passes, so :class:`Row` refuses a target without a baseline unless its value is itself
a ratio (unit ``x``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

# min_ratio / max_ratio: the per-run ratio to the baseline; max_value: only for a value that is
# itself a same-run ratio (unit "x"); info: no target.
Kind = Literal["min_ratio", "max_ratio", "max_value", "info"]


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    label: str
    unit: str
    baseline: str | None = None  # key of the baseline row (or "ideal:<rate>", or a rule)
    kind: Kind = "info"
    target: float | None = None  # min or max ratio to the baseline (max_value: of a ratio)

    def __post_init__(self) -> None:
        ratio = self.kind in ("min_ratio", "max_ratio")
        if (self.target is None) != (self.kind == "info") or (ratio and self.baseline is None):
            raise ValueError(f"bench row {self.key}: a target needs a kind, a ratio needs a baseline")
        if self.kind == "max_value" and self.unit != "x":
            raise ValueError(
                f"bench row {self.key}: an absolute target fails on a slower machine; "
                "give it a same-run baseline and kind max_ratio"
            )


ROWS = (
    Row("raw_put", "raw beanstalkd pipelined put", "jobs/s"),
    Row("raw_insert_one", "raw insert_one, 50 concurrent", "docs/s"),
    Row("raw_insert_many", "raw insert_many, batches of 1,000", "docs/s"),
    Row("raw_claim", "raw find_one_and_update by _id, 50 concurrent", "ops/s"),
    Row("raw_bulk", "raw bulk_write of 100 updates", "updates/s"),
    Row("send", "producer send, 50 concurrent", "mails/s", "raw_insert_one", "min_ratio", 0.85),
    Row("send_many", "producer send_many, batches of 1,000", "mails/s", "raw_insert_many", "min_ratio", 0.80),
    Row("drain", "drain 1 proc, c=50, 0 ms vendor", "mails/s", "raw_claim", "min_ratio", 0.60),
    # An idle loop that is asleep somewhere shows up as a stall of about its reserve timeout.
    Row(
        "stall", "no stall: send -> delete once the tube ran dry", "s", "reserve_timeout_s", "max_ratio", 0.5
    ),
    Row("drain_100", "drain 1 proc, c=50, 100 ms vendor", "mails/s", "ideal:500", "min_ratio", 0.90),
    Row("drain_2p", "drain 2 procs, c=50 each, 0 ms vendor", "mails/s", "raw_claim"),
    Row("drain_200", "drain 1 proc, c=200, 100 ms vendor", "mails/s", "min(2000, drain)", "min_ratio", 0.90),
    Row("cpu_send", "producer CPU per mail, send", "us", "raw_insert_one_cpu", "max_ratio", 0.5),
    Row("cpu_send_many", "producer CPU per mail, send_many", "us", "raw_insert_many_cpu", "max_ratio", 12.0),
    Row("cpu_consumer", "consumer CPU per mail (c=50, 0 ms)", "us", "raw_claim_cpu", "max_ratio", 1.25),
    Row("rss_50", "consumer peak RSS, c=50 (the drain row)", "MB"),
    Row("rss_200", "consumer peak RSS, c=200", "MB", "rss_50", "max_ratio", 1.5),
    # One caller awaiting each send in turn (the original's README example), and send_many,
    # against what the original does per mail, from the same Python (loadtest.lonecases).
    Row("raw_lone", "raw insert_one + put, one task, in turn", "mails/s"),
    Row("raw_many_put", "raw insert_many of 1,000 + put_many", "mails/s"),
    Row("lone_send", "producer send, one task, in turn", "mails/s", "raw_lone", "min_ratio", 0.95),
    Row("lone_p50", "lone send latency p50", "ms"),
    Row("lone_p99", "lone send latency p99", "ms"),
    Row("cpu_lone", "producer CPU per mail, lone send", "us", "raw_lone_cpu"),
    Row("cpu_lone_x", "lone send CPU / raw insert_one + put CPU", "x", None, "max_value", 1.2),
    Row(
        "many_send",
        "producer send_many vs raw insert_many + put_many",
        "mails/s",
        "raw_many_put",
        "min_ratio",
        0.80,
    ),
    # Several beanstalkd servers (issue 13): what a second server changes, same consumers.
    Row("fleet_1", "drain 2 procs over 1 beanstalkd server", "mails/s"),
    Row("fleet_2", "drain 2 procs over 2 beanstalkd servers", "mails/s", "fleet_1"),
    Row("api_send", "POST /v1/emails, 50 keep-alive clients", "mails/s", "send", "min_ratio", 0.60),
    Row("api_batch", "POST /v1/emails/batch, 1,000 per request", "mails/s", "send_many", "min_ratio", 0.70),
    Row("cpu_api_send", "mailer-api CPU per mail, single", "us", "cpu_send"),
    Row("cpu_api_batch", "mailer-api CPU per mail, batch", "us", "cpu_send_many"),
    # The console (issue 11): server time per page with 100,000 mails stored, against the
    # issue's 150 ms budget; and what its indexes cost send (loadtest.consolecases).
    Row("console_first_ms", "console: first page (50 rows)", "ms", "ideal:150", "max_ratio", 1.0),
    Row("console_deep_ms", "console: a page 1,000 rows deep", "ms", "ideal:150", "max_ratio", 1.0),
    Row(
        "console_filtered_ms",
        "console: status failed + recipient prefix",
        "ms",
        "ideal:150",
        "max_ratio",
        1.0,
    ),
    Row("send_no_console_idx", "send, 50 concurrent, without the console's indexes", "mails/s"),
    Row(
        "send_console_idx",
        "send, 50 concurrent, with the console's indexes",
        "mails/s",
        "send_no_console_idx",
        "min_ratio",
        0.90,
    ),
    # Rate limits: 2 consumer processes, one vendor limited (its configured rate is the scale).
    Row(
        "rate_max_1s",
        "limited vendor: most sends in any sliding 1 s",
        "sends",
        "rate_limit",
        "max_ratio",
        1.10,
    ),
    Row("rate_avg", "limited vendor: average rate", "sends/s", "rate_limit", "min_ratio", 0.90),
    Row("rate_others_min", "other vendors meanwhile (slowest)", "sends/s", "rate_limit", "min_ratio", 1.5),
    # Throttling: 30% of one vendor's sends answered 429 with Retry-After.
    Row("throttle_settle_s", "throttled run: 200 mails settled", "s", "throttle_budget_s", "max_ratio", 1.0),
    Row("throttle_mark_s", "throttled vendor: longest mark", "s", "throttle_retry_after_s", "max_ratio", 5.0),
)


@dataclass(slots=True)
class Samples:
    """Per-run values by key: every row's value and the baselines' CPU figures."""

    runs: list[dict[str, float]] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [run[key] for run in self.runs if key in run]

    def baseline(self, row: Row, run: dict[str, float]) -> float | None:
        if row.baseline is None:
            return None
        if row.baseline.startswith("ideal:"):
            return float(row.baseline.removeprefix("ideal:"))
        if row.baseline == "min(2000, drain)":
            return min(2000.0, run["drain"]) if "drain" in run else None
        return run.get(row.baseline)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def summarise(samples: Samples) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for row in ROWS:
        values = samples.values(row.key)
        pairs = [(run[row.key], samples.baseline(row, run)) for run in samples.runs if row.key in run]
        baselines = [b for _, b in pairs if b is not None]
        ratios = [v / b for v, b in pairs if b]
        entry: dict[str, Any] = {
            "key": row.key,
            "label": row.label,
            "unit": row.unit,
            "value": _stats(values),
            "baseline_of": row.baseline,
            "baseline": _stats(baselines),
            "ratio": _stats(ratios),
            "target": _target_text(row),
            "pass": _passes(row, values, ratios),
        }
        out.append(entry)
    return out


def _target_text(row: Row) -> str | None:
    if row.kind == "min_ratio":
        return f">= {row.target:.0%} of baseline"
    if row.kind == "max_ratio":
        return f"<= {row.target:g}x baseline"
    if row.kind == "max_value":
        return f"<= {row.target:g}x"
    return None


def _passes(row: Row, values: list[float], ratios: list[float]) -> bool | None:
    if row.target is None or not values:
        return None
    if row.kind == "min_ratio":
        return bool(ratios) and statistics.median(ratios) >= row.target
    if row.kind == "max_ratio":
        return bool(ratios) and statistics.median(ratios) <= row.target
    return statistics.median(values) <= row.target


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for dist in ("pymongo", "nx-27017", "uvloop"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes under mailer/: the figures are then not those of the commit alone.
        "mailer_modified": bool(_git("status", "--porcelain", "--", "mailer")),
    }


def _git(*args: str) -> str | None:
    """A read-only git query in the project, or None when git is not there."""
    try:
        done = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parents[1],
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f}"
    if unit in ("MB",) or value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def markdown(rows: list[dict[str, Any]], runs: int, host: dict[str, Any]) -> str:
    lines = [
        f"Measured on {host['nproc']} cores ({host['cpu_model'] or 'unknown CPU'}), Python {host['python']}, "
        f"local beanstalkd and nx-27017 {host['packages'].get('nx-27017') or ''}; medians of {runs} "
        "run(s). Ratio = value / baseline of the same run (for CPU rows: / the raw client's CPU per "
        "operation; for RSS: / the c=50 consumer's; for the stall: / the reserve timeout); every "
        "target is a ratio, pass/fail on the median.",
        "",
        f"| case | median (min-max), {runs} run{'s' if runs != 1 else ''} | baseline (same run) "
        "| ratio | target | pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        v, b, q = r["value"], r["baseline"], r["ratio"]
        if v is None:
            continue
        unit = r["unit"]
        value = f"{_fmt(v['median'], unit)} {unit} ({_fmt(v['min'], unit)}-{_fmt(v['max'], unit)})"
        base = f"{_fmt(b['median'], unit)} ({r['baseline_of']})" if b else "-"
        ratio = f"{q['median']:.2f}" if q else "-"
        verdict = {True: "yes", False: "**no**", None: "-"}[r["pass"]]
        lines.append(f"| {r['label']} | {value} | {base} | {ratio} | {r['target'] or '-'} | {verdict} |")
    return "\n".join(lines) + "\n"


def write(out_dir: Path, rows: list[dict[str, Any]], samples: Samples, config: dict[str, Any]) -> str:
    """Write results.json and results.md (each via a temporary file: never half-written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    host = machine()
    table = markdown(rows, len(samples.runs), host)
    doc = {"machine": host, "config": config, "rows": rows, "runs": samples.runs, "extra": samples.extra}
    for name, text in (("results.json", json.dumps(doc, indent=2) + "\n"), ("results.md", table)):
        tmp = out_dir / f"{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)
    return table
