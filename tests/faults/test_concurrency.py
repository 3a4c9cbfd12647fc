"""Two consumer processes and two producers at once over 5,000 mails."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mailer.store import MailStore

from .harness import (
    ConsumerProcess,
    Feeder,
    Processes,
    ScenarioSettings,
    all_accepted,
    assert_clean,
    record,
    tally,
    total_sends,
    wait_settled,
)

N = 5000


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_two_consumers_two_producers_5000_mails(
    make_scenario: ScenarioSettings, procs: Processes, tmp_path: Path
) -> None:
    """Both consumers also run their requeue sweep every 2 s (two sweeps at once, racing the
    claims), so twin jobs are in play too. Sends are counted on the vendor side in each
    consumer process: a mail both delivered would show up twice."""
    settings = make_scenario(
        "two_by_two",
        ttr_s=30,
        simulation={"latency_ms": 5},
        consumer={"requeue_interval_s": 2.0, "requeue_older_than_s": 1.0},
    )
    began = time.monotonic()
    async with MailStore(settings) as store:
        consumers = []
        for _ in range(2):
            c = procs.add(ConsumerProcess(settings, tmp_path, concurrency=50))
            assert isinstance(c, ConsumerProcess)
            consumers.append(c)
        await asyncio.gather(*(c.start() for c in consumers))
        feeders = [Feeder(settings, "pa"), Feeder(settings, "pb")]
        await asyncio.gather(*(f.run(N // 2, batch=100) for f in feeders))
        produced = time.monotonic()
        settled = await wait_settled(store, N, within=120, what="(2 consumers, 2 producers)")
        sends = total_sends(consumers)
        per_consumer = [sum(c.sends().values()) for c in consumers]
        accepted = all_accepted(*feeders)
        t = await tally(store, accepted, sends)
        twins = sum(c.output().count("twin job") + c.output().count("already sent") for c in consumers)
        record(
            "2 consumers + 2 producers, 5,000 mails",
            t,
            recover_s=settled - began,
            total_s=time.monotonic() - began,
            notes=(
                f"produced in {produced - began:.1f} s; "
                f"sends per consumer {per_consumer[0]}/{per_consumer[1]}; "
                f"{twins} twin or repeated job(s) deleted unsent"
            ),
        )
        for c in consumers:
            assert await c.terminate() == 0, c.tail()
    assert not any(f.errors for f in feeders), [f.errors for f in feeders]
    assert len(accepted) == N
    assert min(per_consumer) > N // 10, per_consumer
    assert_clean(t)
    assert t.sent_once == N
