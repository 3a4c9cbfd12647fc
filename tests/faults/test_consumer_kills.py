"""Consumers SIGKILLed again and again under load, each replaced at once."""

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
    assert_clean,
    crash_window,
    record,
    settled_within,
    tally,
    total_sends,
    wait_until,
)

N = 3000
KILLS = 6
EVERY_S = 2.0
CONCURRENCY = 20


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_repeated_consumer_sigkills_under_load(
    make_scenario: ScenarioSettings, procs: Processes, tmp_path: Path
) -> None:
    """Two consumers (20 loops each, 200 ms sends) deliver a growing backlog while a producer
    sends; every 2 s one of them is SIGKILLed and a new one started, 6 times. A dead
    consumer's reserved jobs are ready again at once, but its mails are still leased: they
    wait out the lease (TTR 4 s) and are taken over. The only duplicates allowed are the
    documented crash window: mails a killed consumer's vendor accepted that MongoDB had not
    recorded as sent by it at the kill (read right after each kill, before any of its leases
    can run out), and at most one per loop of each kill."""
    settings = make_scenario("consumer_kills", ttr_s=4, simulation={"latency_ms": 200})
    began = time.monotonic()
    async with MailStore(settings) as store:
        live = [ConsumerProcess(settings, tmp_path, concurrency=CONCURRENCY) for _ in range(2)]
        everyone = list(live)
        for c in live:
            procs.add(c)
        await asyncio.gather(*(c.start() for c in live))
        feeder = Feeder(settings, "ck")
        # ~300 mails/s offered against 200/s of delivery: a backlog the whole time, past the last kill.
        feeding = asyncio.create_task(feeder.run(N, batch=50, pause=0.15))
        window: set[str] = set()
        sends_at_kill: list[int] = []
        in_flight_at_kill: list[int] = []
        last_kill = time.monotonic()
        for k in range(KILLS):
            await asyncio.sleep(EVERY_S)
            victim = live[k % 2]
            victim.kill()
            last_kill = time.monotonic()
            window |= await crash_window(store, victim)
            in_flight_at_kill.append(
                await store.mails.count_documents(
                    {"status": {"$eq": "sending"}, "consumer": {"$eq": victim.consumer_id}}
                )
            )
            sends_at_kill.append(sum(victim.sends().values()))
            replacement = ConsumerProcess(settings, tmp_path, concurrency=CONCURRENCY)
            procs.add(replacement)
            everyone.append(replacement)
            await replacement.start()
            live[k % 2] = replacement
        await asyncio.wait_for(feeding, 60)
        settled = await settled_within(store, N, within=60, what="after the last kill")
        sends = total_sends(everyone)
        t = await tally(store, feeder.accepted, sends, window=window)
        twice = sorted(m for m, n in sends.items() if n > 1)
        record(
            "consumer SIGKILL x6 under load (2 consumers)",
            t,
            recover_s=None if settled is None else settled - last_kill,
            total_s=time.monotonic() - began,
            notes=(
                f"a kill every {EVERY_S:.0f} s, {CONCURRENCY} loops each, TTR 4 s; killed consumers had "
                f"made {'/'.join(map(str, sends_at_kill))} sends, with "
                f"{'/'.join(map(str, in_flight_at_kill))} in flight at the kill; {len(window)} mail(s) "
                f"in the crash window "
                f"(vendor accepted, not recorded at the kill); sent twice: "
                + (", ".join(twice[:6]) + (" ..." if len(twice) > 6 else "") if twice else "none")
                + ("" if settled is not None else f"; NOT settled 60 s after: {t.statuses}")
            ),
        )
        for c in live:
            assert c.alive, c.tail()
            assert await c.terminate() == 0, c.tail()

        async def killed_all() -> bool:
            return all(not c.alive for c in everyone if c not in live)

        await wait_until(killed_all, within=5, what="the killed consumers to be gone")
    assert not feeder.errors, feeder.errors
    assert len(feeder.accepted) == N
    assert all(sends_at_kill), f"every kill should land while its consumer delivered: {sends_at_kill}"
    assert sum(in_flight_at_kill) >= KILLS, f"kills should land mid-delivery: {in_flight_at_kill}"
    assert_clean(t, allowed_twice=min(len(window), KILLS * CONCURRENCY))
    assert t.sent_once + t.sent_twice == N
