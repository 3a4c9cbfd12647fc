"""Vendor outages: one vendor down, then all of them for longer than the back-off, then back;
and a vendor that accepts the connection and never answers."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest
from helpers import running_consumer
from vendors.http_doubles import MAILGUN_DOMAIN, MAILGUN_KEY, Hang, MailgunDouble

from mailer.config import MailgunSettings
from mailer.errors import TransientVendorError
from mailer.store import MailStore
from mailer.vendors.fake import FakeVendor
from mailer.vendors.mailgun import MailgunVendor

from .harness import (
    Feeder,
    ScenarioSettings,
    assert_clean,
    record,
    tally,
    wait_settled,
    wait_until,
)

OUTAGE_S = 8.0
NAMES = ("amazon", "mailgun", "sendinblue", "sparkpost")


def delivered(vendors: list[FakeVendor]) -> collections.Counter[str]:
    return collections.Counter(m for v in vendors for m in v.delivered)


def down(name: str) -> TransientVendorError:
    return TransientVendorError(name, "HTTP 503: service unavailable (scripted outage)")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_one_vendor_down_then_all_then_back(make_scenario: ScenarioSettings) -> None:
    """Real time, short settings: a failed vendor is skipped for 1 s (then probed), retries
    back off 1, 2, 4 ... s, at most 5 rounds. The full outage lasts 8 s: longer than the
    cooldown and the first three back-offs, shorter than the whole retry budget (15 s), so
    every mail must go out once the vendors are back. Sends take 200 ms, as real vendors'
    do; that is what exposed mails spending rounds waiting on other mails' probes."""
    settings = make_scenario(
        "vendors_down",
        ttr_s=30,
        consumer={
            "vendor_cooldown_s": 1.0,
            "backoff_base_s": 1.0,
            "backoff_cap_s": 8.0,
            "max_attempts": 5,
            "registry_refresh_s": 0.5,
        },
    )
    vendors = [FakeVendor(n, latency_s=0.2) for n in NAMES]
    mailgun = vendors[1]
    began = time.monotonic()
    async with MailStore(settings) as store, running_consumer(settings, vendors, concurrency=20):
        # 1. mailgun down: its mails fail over, the other three share the load.
        mailgun.default = down("mailgun")
        first = Feeder(settings, "v1")
        await first.run(200, batch=50)
        await wait_settled(store, 200, within=30, what="(one vendor down)")
        phase1 = {v.name: len(v.delivered) for v in vendors}
        mark = await store.vendor_status.find_one({"_id": "mailgun"})

        # 2. every vendor down for longer than the back-off.
        for v in vendors:
            v.default = down(v.name)
        outage = time.monotonic()
        second = Feeder(settings, "v2")
        await second.run(200, batch=50)

        async def all_marked() -> bool:
            marks = await store.vendor_marks()
            return all(marks.get(n, (0.0, ""))[0] > time.time() - 0.5 for n in NAMES)

        await wait_until(all_marked, within=10, what="every vendor marked unavailable")
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage)))
        retrying = await store.mails.count_documents({"status": {"$eq": "retrying"}})
        sent_in_outage = sum(len(v.delivered) for v in vendors) - sum(phase1.values())

        # 3. all back.
        for v in vendors:
            v.default = None
        back = time.monotonic()
        settled = await wait_settled(store, 400, within=60, what="(vendors back)")
        accepted = first.accepted + second.accepted
        t = await tally(store, accepted, delivered(vendors))
        max_rounds = max([int(d.get("rounds", 0)) async for d in store.mails.find({}, {"rounds": 1})])
        record(
            "one vendor down, then all, then back",
            t,
            recover_s=settled - back,
            total_s=time.monotonic() - began,
            notes=(
                f"mailgun down: others sent {phase1['amazon']}/{phase1['sendinblue']}/{phase1['sparkpost']}; "
                f"all down {OUTAGE_S:.0f} s: {retrying} retrying, {sent_in_outage} sent; "
                f"up to {max_rounds} rounds"
            ),
        )
    assert phase1["mailgun"] == 0
    assert min(phase1["amazon"], phase1["sendinblue"], phase1["sparkpost"]) >= 40, phase1
    assert mark is not None and mark["until"] > 0
    assert retrying > 0 and sent_in_outage == 0
    assert_clean(t)
    assert t.sent_once == 400, f"every mail should go out once the vendors are back: {t.statuses}"


class HangingMailgun(MailgunDouble):
    """Reads every request and never answers."""

    def success(self, request: object) -> Hang:  # type: ignore[override]
        return Hang()

    def check(self, request: object) -> None:  # type: ignore[override]
        return None


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_vendor_that_hangs(make_scenario: ScenarioSettings) -> None:
    """A real HTTP adapter (Mailgun, 0.5 s timeout) against a server that accepts and never
    answers: the timeout fires, the vendor is marked, every mail goes on through another."""
    settings = make_scenario("vendor_hang", ttr_s=30, consumer={"vendor_cooldown_s": 60.0})
    double = HangingMailgun()
    await double.start()
    mailgun = MailgunVendor(
        MailgunSettings(api_key=MAILGUN_KEY, domain=MAILGUN_DOMAIN, base_url=double.base_url, timeout_s=0.5)
    )
    others = [FakeVendor(n, latency_s=0.005) for n in ("amazon", "sendinblue", "sparkpost")]
    vendors = [others[0], mailgun, others[1], others[2]]
    n = 40
    began = time.monotonic()
    try:
        async with MailStore(settings) as store, running_consumer(settings, vendors, concurrency=10):
            feeder = Feeder(settings, "hang")
            await feeder.run(n, batch=n)
            settled = await wait_settled(store, n, within=30, what="(mailgun hangs)")
            t = await tally(store, feeder.accepted, delivered(others))
            timeouts: list[float] = []
            async for doc in store.mails.find({}, {"attempts": 1}):
                for a in doc["attempts"]:
                    if a["vendor"] == "mailgun":
                        assert a["outcome"] == "unknown", a
                        assert "timed out" in (a.get("error") or ""), a
                        timeouts.append((a["finished_at"] - a["started_at"]).total_seconds())
            mark = await store.vendor_status.find_one({"_id": "mailgun"})
            record(
                "vendor hangs (no response)",
                t,
                recover_s=settled - began,
                total_s=time.monotonic() - began,
                notes=(
                    f"{len(double.requests)} request(s) reached the hung vendor, each failed over after "
                    f"{min(timeouts or [0]):.2f}-{max(timeouts or [0]):.2f} s (ambiguous: a real vendor "
                    "might have accepted them); vendor marked for 60 s"
                ),
            )
    finally:
        await double.stop()
    assert double.requests, "some mails should have been routed to the hung vendor"
    assert len(timeouts) == len(double.requests)
    assert all(0.4 <= s < 2.0 for s in timeouts), timeouts
    assert mark is not None and mark["until"] > time.time() + 30
    assert "timed out" in mark["reason"]
    assert_clean(t)
    assert t.sent_once == n
