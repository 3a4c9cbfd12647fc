"""Round robin by job id and the circuit-breaker registry, with an injected clock (no real
cooldown is ever slept through); the shared marks against the real nx-27017."""

from __future__ import annotations

import collections

import pytest
from helpers import VENDOR_NAMES, FakeClock, fake_vendors, vendor_mark, wait_until

from mailer.config import Settings
from mailer.errors import TransientVendorError, VendorAuthError, VendorThrottled
from mailer.ratelimit import RateLimiter
from mailer.routing import THROTTLE_PREFIX, VendorRegistry
from mailer.store import MailStore
from mailer.vendors.fake import FakeVendor

COOLDOWN = 600.0


def registry(clock: FakeClock, *, store: MailStore | None = None, refresh_s: float = 5.0) -> VendorRegistry:
    return VendorRegistry(fake_vendors(), store=store, cooldown_s=COOLDOWN, refresh_s=refresh_s, clock=clock)


def names(vendors: list[FakeVendor] | list[object]) -> list[str]:
    return [v.name for v in vendors]  # type: ignore[attr-defined]


def by_name(reg: VendorRegistry, name: str) -> FakeVendor:
    return next(v for v in reg.vendors if v.name == name)  # type: ignore[return-value]


def transient(name: str, **kw: object) -> TransientVendorError:
    return TransientVendorError(name, "503 service unavailable", **kw)  # type: ignore[arg-type]


# --- round robin -----------------------------------------------------------------------


def test_plan_is_round_robin_by_job_id_then_the_next_ones_wrapping() -> None:
    reg = registry(FakeClock())
    assert names(reg.plan(0)) == ["amazon", "mailgun", "sendinblue", "sparkpost"]
    assert names(reg.plan(1)) == ["mailgun", "sendinblue", "sparkpost", "amazon"]
    assert names(reg.plan(7)) == ["sparkpost", "amazon", "mailgun", "sendinblue"]
    assert names(reg.plan(90_489)) == names(reg.plan(1))


def test_4000_jobs_over_4_vendors_are_1000_each() -> None:
    reg = registry(FakeClock())
    picks = collections.Counter(reg.plan(job_id)[0].name for job_id in range(12_345, 16_345))
    assert picks == dict.fromkeys(VENDOR_NAMES, 1000)


def test_with_one_vendor_down_the_other_three_share_its_load_evenly() -> None:
    reg = registry(FakeClock())
    reg.failed(by_name(reg, "mailgun"), transient("mailgun"))
    plans = [names(reg.plan(job_id)) for job_id in range(3000)]
    assert all("mailgun" not in p for p in plans)
    assert collections.Counter(p[0] for p in plans) == {"amazon": 1000, "sendinblue": 1000, "sparkpost": 1000}
    # available[job_id % 3], then the next ones of the available list
    assert plans[4] == ["sendinblue", "sparkpost", "amazon"]


def test_no_vendor_available_gives_an_empty_plan_and_when_one_comes_back() -> None:
    clock = FakeClock(1_000_000.0)
    reg = registry(clock)
    for i, vendor in enumerate(reg.vendors):
        clock.advance(1)
        reg.failed(vendor, transient(vendor.name, retry_after=COOLDOWN + i))
    assert reg.plan(5) == []
    assert reg.available() == []
    # amazon was marked first: it comes back first
    assert reg.next_available_at() == pytest.approx(1_000_001.0 + COOLDOWN)


def test_registry_refuses_no_vendors_or_duplicate_names() -> None:
    with pytest.raises(ValueError, match="at least one"):
        VendorRegistry([])
    with pytest.raises(ValueError, match="unique"):
        VendorRegistry([FakeVendor("amazon"), FakeVendor("amazon")])


# --- the circuit breaker ---------------------------------------------------------------


def test_transient_failure_opens_the_breaker_for_the_cooldown_then_half_open_probe() -> None:
    clock = FakeClock()
    reg = registry(clock)
    mailgun = by_name(reg, "mailgun")
    assert reg.begin(mailgun)
    reg.failed(mailgun, transient("mailgun"))
    until, reason = reg.snapshot()["mailgun"]
    assert until == pytest.approx(clock() + COOLDOWN)
    assert "503" in reason
    assert not reg.is_available("mailgun") and not reg.begin(mailgun)

    clock.advance(COOLDOWN - 1)
    assert not reg.is_available("mailgun") and "mailgun" not in names(reg.available())

    clock.advance(2)  # cooldown over: half-open
    assert reg.is_available("mailgun")
    assert reg.begin(mailgun)  # this send is the probe ...
    assert not reg.begin(mailgun)  # ... and nobody else goes through meanwhile
    assert "mailgun" not in names(reg.available())
    assert all("mailgun" not in names(reg.plan(j)) for j in range(8))

    reg.succeeded(mailgun)  # the probe worked: closed
    assert reg.snapshot()["mailgun"] == (0.0, "")
    assert reg.begin(mailgun) and reg.begin(mailgun)  # closed: no probing limit any more
    assert names(reg.plan(1))[0] == "mailgun"


def test_a_send_begun_before_the_mark_that_succeeds_late_does_not_close_the_breaker() -> None:
    clock = FakeClock()
    reg = registry(clock)
    mailgun = by_name(reg, "mailgun")
    assert reg.begin(mailgun) and reg.begin(mailgun)  # two sends in flight
    reg.failed(mailgun, transient("mailgun"))  # the first fails: marked
    reg.succeeded(mailgun)  # the second, begun before the mark, succeeds late
    assert not reg.is_available("mailgun")
    assert reg.snapshot()["mailgun"][0] == pytest.approx(clock() + COOLDOWN)


def test_a_mark_adopted_from_another_process_is_not_lifted_by_a_late_success() -> None:
    clock = FakeClock()
    reg = registry(clock)
    amazon = by_name(reg, "amazon")
    assert reg.begin(amazon)
    reg._breakers["amazon"].until = clock() + COOLDOWN  # what refresh() adopts
    reg.succeeded(amazon)
    assert not reg.is_available("amazon")


def test_failed_probe_opens_the_breaker_for_another_full_cooldown() -> None:
    clock = FakeClock()
    reg = registry(clock)
    mailgun = by_name(reg, "mailgun")
    reg.failed(mailgun, transient("mailgun"))
    clock.advance(COOLDOWN + 1)
    assert reg.begin(mailgun)
    reg.failed(mailgun, transient("mailgun"))
    assert reg.snapshot()["mailgun"][0] == pytest.approx(clock() + COOLDOWN)
    clock.advance(COOLDOWN - 1)
    assert not reg.begin(mailgun)
    clock.advance(2)
    assert reg.begin(mailgun)


def test_retry_after_longer_than_the_cooldown_extends_the_unavailability() -> None:
    clock = FakeClock()
    reg = registry(clock)
    mailgun = by_name(reg, "mailgun")
    reg.failed(mailgun, transient("mailgun", retry_after=3 * COOLDOWN))
    assert reg.snapshot()["mailgun"][0] == pytest.approx(clock() + 3 * COOLDOWN)
    clock.advance(COOLDOWN + 1)
    assert not reg.is_available("mailgun")
    clock.advance(2 * COOLDOWN)
    assert reg.is_available("mailgun")


def test_retry_after_shorter_than_the_cooldown_does_not_shorten_it() -> None:
    clock = FakeClock()
    reg = registry(clock)
    amazon = by_name(reg, "amazon")
    reg.failed(amazon, transient("amazon", retry_after=5))
    assert reg.snapshot()["amazon"][0] == pytest.approx(clock() + COOLDOWN)


def test_auth_error_opens_the_breaker_and_logs_loudly(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    reg = registry(clock)
    sparkpost = by_name(reg, "sparkpost")
    reg.failed(sparkpost, VendorAuthError("sparkpost", "401 invalid API key"))
    assert not reg.is_available("sparkpost")
    assert any(r.levelname == "ERROR" and "vendors.sparkpost" in r.getMessage() for r in caplog.records)


def test_released_probe_ends_the_probe_without_closing_the_breaker() -> None:
    clock = FakeClock()
    reg = registry(clock)
    amazon = by_name(reg, "amazon")
    reg.failed(amazon, transient("amazon"))
    clock.advance(COOLDOWN + 1)
    assert reg.begin(amazon)
    reg.released(amazon)  # e.g. a permanent error for that one mail: no verdict on the vendor
    assert reg.snapshot()["amazon"][0] > 0
    assert reg.begin(amazon)  # the next send probes again


# --- marks shared through MongoDB --------------------------------------------------------


async def test_marks_are_shared_by_every_registry_on_the_store(settings: Settings) -> None:
    clock = FakeClock()
    async with MailStore(settings) as store_a, MailStore(settings) as store_b:
        a = registry(clock, store=store_a)
        b = registry(clock, store=store_b, refresh_s=0.05)  # "another process"
        await a.start()
        await b.start()
        try:
            a.failed(by_name(a, "mailgun"), transient("mailgun"))
            mark = await wait_until(lambda: vendor_mark(store_a, "mailgun"), what="the shared mark")
            assert mark["until"] == pytest.approx(clock() + COOLDOWN)
            assert "503" in mark["reason"]
            # b adopts it on its next refresh: no read per mail
            await wait_until(lambda: not b.is_available("mailgun"), within=5, what="b to see the mark")
            assert "mailgun" not in names(b.plan(1))

            # a registry started later loads the marks at start
            c = registry(clock, store=store_b)
            await c.start()
            assert not c.is_available("mailgun")
            await c.close()

            # after the cooldown b probes it; success clears the mark for everyone
            clock.advance(COOLDOWN + 1)
            mailgun_b = by_name(b, "mailgun")
            assert b.begin(mailgun_b)
            b.succeeded(mailgun_b)

            async def cleared() -> bool:
                m = await vendor_mark(store_a, "mailgun")
                return m is not None and m["until"] == 0.0

            await wait_until(cleared, what="the mark to be cleared in MongoDB")
            await a.refresh()
            assert a.snapshot()["mailgun"] == (0.0, "")
        finally:
            await a.close()
            await b.close()


async def test_rival_marks_keep_the_longest(settings: Settings) -> None:
    async with MailStore(settings) as store:
        await store.mark_vendor("amazon", 2_000.0, "long")
        await store.mark_vendor("amazon", 1_000.0, "short")
        marks = await store.vendor_marks()
        assert marks["amazon"][0] == 2_000.0
        await store.clear_vendor("amazon")
        assert (await store.vendor_marks())["amazon"] == (0.0, "")


async def test_a_cleared_or_deleted_mark_is_adopted_at_the_next_refresh(settings: Settings) -> None:
    """`mailer vendors --reset` clears a mark; an operator may also delete it by hand. Either
    way a running consumer must use the vendor again without waiting out its cooldown."""
    clock = FakeClock()
    async with MailStore(settings) as store:
        a = registry(clock, store=store)
        b = registry(clock, store=store)  # a running consumer that did not mark anything
        await a.start()
        await b.start()
        try:
            for name in ("amazon", "mailgun"):
                a.failed(by_name(a, name), transient(name))
            await wait_until(lambda: vendor_mark(store, "mailgun"), what="the shared marks")
            await b.refresh()
            assert not b.is_available("amazon") and not b.is_available("mailgun")

            await store.clear_vendor("amazon")  # what `mailer vendors --reset amazon` does
            await store.vendor_status.delete_one({"_id": "mailgun"})  # by hand
            await b.refresh()
            assert b.snapshot()["amazon"] == (0.0, "")
            assert b.snapshot()["mailgun"] == (0.0, "")
            assert names(b.plan(0)) == list(VENDOR_NAMES)
        finally:
            await a.close()
            await b.close()


async def test_a_refresh_never_drops_a_mark_whose_write_is_still_pending(settings: Settings) -> None:
    """The registry shares its marks in the background: a refresh that reads MongoDB before
    the write lands must not take the just-marked vendor back."""
    clock = FakeClock()
    async with MailStore(settings) as store:
        reg = registry(clock, store=store)
        await reg.start()
        try:
            reg.failed(by_name(reg, "sparkpost"), transient("sparkpost"))
            assert reg._pending_writes  # the mark is not in MongoDB yet
            await reg.refresh()
            assert not reg.is_available("sparkpost")
        finally:
            await reg.close()


# --- throttling is not an outage ---------------------------------------------------------


def throttle(name: str, retry_after: float | None = None) -> VendorThrottled:
    return VendorThrottled(name, "HTTP 429: Too many requests", retry_after=retry_after)


def test_a_throttle_pauses_the_vendor_for_its_retry_after_then_everyone_sends_without_a_probe() -> None:
    clock = FakeClock()
    reg = registry(clock)
    mailgun = by_name(reg, "mailgun")
    assert reg.begin(mailgun)
    assert reg.throttled(mailgun, throttle("mailgun", retry_after=1.0)) == 1.0
    until, reason = reg.snapshot()["mailgun"]
    assert until == pytest.approx(clock() + 1.0) and reason.startswith(THROTTLE_PREFIX)
    assert not reg.is_available("mailgun")
    clock.advance(1.01)
    assert reg.begin(mailgun) and reg.begin(mailgun)  # back for every send at once: no probe
    assert names(reg.plan(1))[0] == "mailgun"


def test_the_default_throttle_pause_doubles_on_repeats_capped_far_below_the_cooldown() -> None:
    clock = FakeClock()
    reg = registry(clock)
    mailgun = by_name(reg, "mailgun")
    pauses = [reg.throttled(mailgun, throttle("mailgun")) for _ in range(8)]
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert max(pauses) < COOLDOWN / 10
    reg.succeeded(mailgun)  # a send went through: the next throttle starts short again
    assert reg.throttled(mailgun, throttle("mailgun")) == 1.0


def test_a_throttle_never_cuts_an_outage_mark_short() -> None:
    clock = FakeClock()
    reg = registry(clock)
    mailgun = by_name(reg, "mailgun")
    reg.failed(mailgun, transient("mailgun"))
    reg.throttled(mailgun, throttle("mailgun", retry_after=1.0))  # a send begun before the mark
    until, reason = reg.snapshot()["mailgun"]
    assert until == pytest.approx(clock() + COOLDOWN) and "503" in reason
    clock.advance(COOLDOWN + 1)
    assert reg.begin(mailgun) and not reg.begin(mailgun)  # the outage still ends with a probe


def test_a_throttled_probe_proves_the_vendor_is_up() -> None:
    clock = FakeClock()
    reg = registry(clock)
    mailgun = by_name(reg, "mailgun")
    reg.failed(mailgun, transient("mailgun"))
    clock.advance(COOLDOWN + 1)
    assert reg.begin(mailgun)  # the probe
    assert reg.throttled(mailgun, throttle("mailgun", retry_after=2.0)) == 2.0
    clock.advance(2.01)
    assert reg.begin(mailgun) and reg.begin(mailgun)


def test_a_throttle_lowers_the_vendors_send_rate_through_the_limiter() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"mailgun": 40.0}, clock=clock)
    reg = VendorRegistry(fake_vendors(), cooldown_s=COOLDOWN, clock=clock, limiter=limiter)
    reg.throttled(by_name(reg, "mailgun"), throttle("mailgun", retry_after=1.0))
    assert limiter.rate("mailgun") == pytest.approx(20.0)
    reg.failed(by_name(reg, "amazon"), transient("amazon"))  # an outage is not a rate problem
    assert limiter.rate("amazon") is None


async def test_a_throttle_pause_is_shared_and_ends_without_a_probe_everywhere(settings: Settings) -> None:
    clock = FakeClock()
    async with MailStore(settings) as store_a, MailStore(settings) as store_b:
        a = registry(clock, store=store_a)
        b = registry(clock, store=store_b, refresh_s=0.05)  # "another process"
        await a.start()
        await b.start()
        try:
            a.throttled(by_name(a, "sparkpost"), throttle("sparkpost", retry_after=3.0))
            await wait_until(lambda: not b.is_available("sparkpost"), within=5, what="b to see the pause")
            until, reason = b.snapshot()["sparkpost"]
            assert until == pytest.approx(clock() + 3.0) and reason.startswith(THROTTLE_PREFIX)
            clock.advance(3.01)
            sparkpost_b = by_name(b, "sparkpost")
            assert b.begin(sparkpost_b) and b.begin(sparkpost_b)  # no probe in b either
        finally:
            await a.close()
            await b.close()
