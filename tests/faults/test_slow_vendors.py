"""Slow vendors and slow consumers against real HTTP adapters: a SIGTERM while every send takes
longer than the grace period, a consumer frozen (SIGSTOP) for longer than the TTR, and a vendor
that trickles its answer a byte a second.

Every consumer here is a process in production mode whose Mailgun, Brevo and SparkPost adapters
talk to local doubles (tests/faults/vendor_doubles.py) over real sockets, so latency, timeouts
and stalls are the real ones; sends are counted on the doubles, by our ``X-Mailer-Id``.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from mailer.config import Settings
from mailer.store import MailStore

from .harness import (
    Feeder,
    HttpConsumerProcess,
    Processes,
    ScenarioSettings,
    assert_clean,
    record,
    settled_within,
    tally,
    wait_until,
)
from .vendor_doubles import CountingVendor, accepted_sends, serving

_HANDED_BACK = re.compile(r"handing back (\d+) unfinished")


def start_consumer(
    procs: Processes, settings: Settings, workdir: Path, vendors: dict[str, BaseModel], *,
    concurrency: int, tag: str = "",
) -> HttpConsumerProcess:  # fmt: skip
    consumer = HttpConsumerProcess(settings, workdir, concurrency=concurrency, vendors=vendors, tag=tag)
    procs.add(consumer)
    return consumer


def sections(doubles: tuple[CountingVendor, ...], timeout_s: float) -> dict[str, BaseModel]:
    return {d.kind: d.section(timeout_s=timeout_s) for d in doubles}


def handed_back(consumer: HttpConsumerProcess) -> int:
    return sum(int(n) for n in _HANDED_BACK.findall(consumer.output()))


# --- 1. SIGTERM while every send outlasts the grace period ---------------------------------------

SLOW_N = 20
SLOW_LATENCY_S = 20.0
SLOW_GRACE_S = 5.0
SLOW_TIMEOUT_S = 30.0


async def first_consumer_or_refusal(
    procs: Processes, make_scenario: ScenarioSettings, tmp_path: Path, vendors: dict[str, BaseModel]
) -> tuple[HttpConsumerProcess, Settings, str]:
    """The SIGTERMed consumer, with grace_s shorter than the vendors' timeout_s. A consumer
    that refuses that configuration is one accepted fix: then the refusal must say which keys
    to change, and the scenario goes on with the grace it asks for (the timeout, plus 5 s)."""
    settings = make_scenario("slow_sigterm", ttr_s=10, consumer={"grace_s": SLOW_GRACE_S})
    consumer = start_consumer(procs, settings, tmp_path, vendors, concurrency=SLOW_N)
    try:
        await consumer.start()
        return consumer, settings, ""
    except AssertionError:
        if consumer.alive:
            raise
    refusal = consumer.output().strip().splitlines()[-1]
    assert consumer.proc is not None and consumer.proc.returncode == 2, consumer.tail()
    assert "grace_s" in refusal and "timeout_s" in refusal, f"the refusal should name both keys: {refusal}"
    settings = make_scenario("slow_sigterm", ttr_s=10, consumer={"grace_s": SLOW_TIMEOUT_S + 5})
    consumer = start_consumer(procs, settings, tmp_path, vendors, concurrency=SLOW_N)
    await consumer.start()
    return consumer, settings, refusal


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_sigterm_with_sends_longer_than_the_grace(
    make_scenario: ScenarioSettings, procs: Processes, tmp_path: Path
) -> None:
    """Every send takes 20 s at the vendor, the grace is 5 s, the vendors' timeout 30 s. The
    vendor goes on with a request it has read (the double accepts each mail when its latency
    ends, whether or not the client still waits), so cancelling an in-flight send and
    handing its mail back makes the next consumer send it again: the grace must cover the
    sends already with a vendor (up to their timeout), or such a config must be refused."""
    doubles = (CountingVendor("mailgun", latency_s=SLOW_LATENCY_S),
               CountingVendor("sendinblue", latency_s=SLOW_LATENCY_S))  # fmt: skip
    began = time.monotonic()
    async with serving(*doubles):
        vendors = sections(doubles, SLOW_TIMEOUT_S)
        first, settings, refusal = await first_consumer_or_refusal(procs, make_scenario, tmp_path, vendors)
        feeder = Feeder(settings, "slow")
        await feeder.run(SLOW_N, batch=SLOW_N)
        assert len(feeder.accepted) == SLOW_N and not feeder.errors
        async with MailStore(settings) as store:

            def all_with_the_vendor() -> bool:
                return sum(len(d.sends) for d in doubles) >= SLOW_N

            await wait_until(all_with_the_vendor, within=30, what=f"{SLOW_N} sends with the vendors")
            first.post_signal(signal.SIGTERM)
            sigterm = time.monotonic()
            second = start_consumer(procs, settings, tmp_path, vendors, concurrency=SLOW_N)
            await second.start()
            code = await first.exited(within=SLOW_TIMEOUT_S + 15)
            exit_s = time.monotonic() - sigterm
            settled = await settled_within(store, SLOW_N, within=60, what="(after the SIGTERM)")
            t = await tally(store, feeder.accepted, accepted_sends(doubles))
            back = handed_back(first)
            record(
                "SIGTERM, vendor sends (20 s) longer than the grace (5 s)",
                t,
                recover_s=None if settled is None else settled - sigterm,
                total_s=time.monotonic() - began,
                notes=(
                    f"{SLOW_N} sends with the vendors at the SIGTERM; the consumer exited after "
                    f"{exit_s:.1f} s (code {code}) handing back {back}; vendor timeout_s "
                    f"{SLOW_TIMEOUT_S:.0f}; a second consumer started at once"
                    + (f"; grace_s {SLOW_GRACE_S:.0f} refused at start" if refusal else "")
                    + ("" if settled is not None else f"; NOT settled in 60 s: {t.statuses}")
                ),
            )
            await second.terminate()
    assert code == 0, first.tail()
    assert settled is not None, f"mails did not settle within 60 s of the SIGTERM: {t.statuses}"
    assert_clean(t)
    assert t.sent_once == SLOW_N
    assert back == 0, f"{back} deliveries already with a vendor were handed back"


# --- 2. a consumer frozen for longer than the TTR -----------------------------------------------

FROZEN_N = 240
FROZEN_TTR_S = 5
FROZEN_CONCURRENCY = 10


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_consumer_frozen_longer_than_the_ttr(
    make_scenario: ScenarioSettings, procs: Processes, tmp_path: Path
) -> None:
    """Two consumers, three vendors answering in 2 s (timeout 4 s), TTR 5 s. One consumer is
    SIGSTOPped for 3x the TTR while the other goes on, then woken. Its sends that were with a
    vendor at the freeze were accepted meanwhile and taken over by the other consumer once the
    lease ran out: those may go twice (the ambiguous window, at most its concurrency). Nothing
    else may: the woken process must not read its own stall as vendor timeouts, mark vendors
    unavailable for everyone (600 s cooldown) or fail over mails another consumer took over."""
    settings = make_scenario("frozen", ttr_s=FROZEN_TTR_S)
    doubles = tuple(CountingVendor(kind, latency_s=2.0) for kind in ("mailgun", "sendinblue", "sparkpost"))
    began, wall_began = time.monotonic(), time.time()
    async with serving(*doubles), MailStore(settings) as store:
        vendors = sections(doubles, 4.0)
        feeder = Feeder(settings, "frozen")
        await feeder.run(FROZEN_N, batch=60)
        assert len(feeder.accepted) == FROZEN_N and not feeder.errors
        sleeper = start_consumer(
            procs, settings, tmp_path, vendors, concurrency=FROZEN_CONCURRENCY, tag="-frozen"
        )
        other = start_consumer(procs, settings, tmp_path, vendors, concurrency=FROZEN_CONCURRENCY)
        await sleeper.start()
        await other.start()

        def steady() -> bool:
            return sum(accepted_sends(doubles).values()) >= 40

        await wait_until(steady, within=30, what="both consumers delivering")
        sleeper.post_signal(signal.SIGSTOP)
        froze = time.monotonic()
        held = {
            str(d["_id"])
            async for d in store.mails.find(
                {"status": {"$eq": "sending"}, "consumer": {"$eq": sleeper.consumer_id}}, {"_id": 1}
            )
        }
        with_vendor = set().union(*(d.received_before(froze) for d in doubles))
        window = held & with_vendor  # already with a vendor when the process froze
        await wait_until(lambda: time.monotonic() - froze >= 3 * FROZEN_TTR_S, within=3 * FROZEN_TTR_S + 5,
                         interval=0.5, what="the freeze to last 3x TTR")  # fmt: skip
        sleeper.post_signal(signal.SIGCONT)
        thawed = time.monotonic()
        settled = await settled_within(store, FROZEN_N, within=60, what="(after SIGCONT)")
        marks = {n: m for n, m in (await store.vendor_marks()).items() if m[0] > wall_began}
        t = await tally(store, feeder.accepted, accepted_sends(doubles), window=window)
        record(
            "consumer frozen (SIGSTOP) 3x TTR, then woken",
            t,
            recover_s=None if settled is None else settled - thawed,
            total_s=time.monotonic() - began,
            notes=(
                f"2 consumers x {FROZEN_CONCURRENCY}, vendors 2 s, timeout 4 s, TTR {FROZEN_TTR_S} s; "
                f"frozen one held {len(held)} claims, {len(window)} with a vendor (ambiguous window); "
                f"vendors marked: {sorted(marks) or 'none'}"
                + ("" if settled is not None else f"; NOT settled 60 s after SIGCONT: {t.statuses}")
            ),
        )
        await other.terminate()
        await sleeper.terminate()
    assert not marks, f"vendors marked unavailable because of the stall: {marks}"
    assert settled is not None, f"mails did not settle within 60 s of SIGCONT: {t.statuses}"
    assert_clean(t, allowed_twice=min(len(window), FROZEN_CONCURRENCY))
    assert t.sent_once + t.sent_twice == FROZEN_N


# --- 3. a vendor that trickles its answer ------------------------------------------------------

TRICKLE_N = 40
TRICKLE_TIMEOUT_S = 2.0


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_vendor_that_trickles_its_answer(
    make_scenario: ScenarioSettings, procs: Processes, tmp_path: Path
) -> None:
    """Mailgun's double writes its whole answer (status line included) one byte a second, so
    no single read ever waits the 2 s ``timeout_s``; Brevo's answers at once. Each send to the
    trickler must still end within about ``timeout_s``, the trickler be marked unavailable and
    every mail go out through Brevo. The trickler counts a send as accepted only when its last
    byte went out; the requests it received are the ambiguous window (a real vendor may have
    sent them), so duplicates are allowed there only."""
    settings = make_scenario("trickle", ttr_s=30, consumer={"vendor_cooldown_s": 60.0})
    trickler = CountingVendor("mailgun", trickle_s=1.0, accept_on="answered")
    healthy = CountingVendor("sendinblue", accept_on="answered")
    doubles = (trickler, healthy)
    began = time.monotonic()
    async with serving(*doubles), MailStore(settings) as store:
        consumer = start_consumer(procs, settings, tmp_path, sections(doubles, TRICKLE_TIMEOUT_S),
                                  concurrency=10)  # fmt: skip
        await consumer.start()
        first_mail = time.monotonic()
        feeder = Feeder(settings, "trickle")
        await feeder.run(TRICKLE_N, batch=TRICKLE_N)
        assert len(feeder.accepted) == TRICKLE_N and not feeder.errors
        settled = await settled_within(store, TRICKLE_N, within=45, what="(mailgun trickles)")
        # The double sees a hang-up between two bytes: give the last ones that long to show.
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: trickler.unfinished() == 0, within=2.0, what="the hang-ups")
        held = trickler.durations()
        attempts = [
            (a["outcome"], (a["finished_at"] - a["started_at"]).total_seconds())
            async for doc in store.mails.find({}, {"attempts": 1})
            for a in doc.get("attempts", [])
            if a["vendor"] == "mailgun"
        ]
        mark = await store.vendor_status.find_one({"_id": "mailgun"})
        marked = mark is not None and mark["until"] > time.time()
        window = set(trickler.received())
        t = await tally(store, feeder.accepted, accepted_sends(doubles), window=window)
        record(
            "vendor trickles its answer (1 byte/s)",
            t,
            recover_s=None if settled is None else settled - first_mail,
            total_s=time.monotonic() - began,
            notes=(
                f"timeout_s {TRICKLE_TIMEOUT_S:.0f}; {len(trickler.sends)} request(s) reached the trickler "
                f"(ambiguous window), held it {min(held or [0]):.1f}-{max(held or [0]):.1f} s, "
                f"{trickler.unfinished()} still trickling at the end, {sum(trickler.accepted().values())} "
                f"answered in full; mailgun {'marked' if marked else 'NOT marked'} unavailable"
                + ("" if settled is not None else f"; NOT settled in 45 s: {t.statuses}")
            ),
        )
        await consumer.terminate()
    assert trickler.sends, "some mails should have been routed to the trickler"
    assert max(held) <= TRICKLE_TIMEOUT_S + 2.0, f"trickled sends held the vendor {max(held):.1f} s"
    assert settled is not None, f"mails did not settle within 45 s: {t.statuses}"
    assert attempts and all(o == "unknown" and s < TRICKLE_TIMEOUT_S + 1.0 for o, s in attempts), attempts
    assert mark is not None and mark["until"] > time.time() + 30, mark
    assert_clean(t, allowed_twice=len(window))
    assert t.sent_once + t.sent_twice == TRICKLE_N
