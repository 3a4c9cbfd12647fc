"""The send-rate limiter: window arithmetic, waiting for tokens on an injected clock (no
real window is slept through), tokens shared by two limiters over the real nx-27017, and
the slow-down after a throttle."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import FakeClock
from pymongo.errors import AutoReconnect

from mailer.config import Settings, load_settings
from mailer.errors import ConfigError
from mailer.ratelimit import RateLimiter, Windows
from mailer.store import MailStore

START = 1_700_000_000.0


class FakeTime(FakeClock):
    """A clock whose sleep moves it: a waiter's sleep is the passing of time itself."""

    async def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 1e-6))
        await asyncio.sleep(0)


def limiter(
    clock: FakeTime,
    limits: dict[str, float],
    *,
    store: MailStore | None = None,
    prefetch: float = 0.5,
    recovery_s: float = 30.0,
) -> RateLimiter:
    return RateLimiter(
        limits, store=store, clock=clock, sleep=clock.sleep, prefetch=prefetch, recovery_s=recovery_s
    )


def max_in_any_second(times: list[float]) -> int:
    times = sorted(times)
    return max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times))


async def drive(lim: RateLimiter, clock: FakeTime, name: str, senders: int, seconds: float) -> list[float]:
    """``senders`` tasks acquiring in a loop for ``seconds`` of fake time; grant times."""
    granted: list[float] = []
    end = clock.now + seconds

    async def sender() -> None:
        while clock.now < end:
            if await lim.acquire(name):
                granted.append(clock.now)
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(senders))), 30)
    return [t for t in granted if t < end]


# --- windows ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "length", "per_second"),
    [(50.0, 0.05, 50), (14.0, 1 / 14, 14), (2.5, 0.5, 2.5), (1000.0, 0.05, 1000), (0.5, 2.0, 0.5)],
)
def test_windows_hold_the_rate_exactly_over_time(rate: float, length: float, per_second: float) -> None:
    w = Windows.for_rate(rate)
    assert float(w.length) == pytest.approx(length)
    k0 = w.index(START)
    seconds = 20
    n = round(seconds / float(w.length))
    assert sum(w.capacity(k) for k in range(k0, k0 + n)) == round(per_second * seconds)
    # one window's tokens at most above the rate in any run of windows making a second
    per = max(1, round(1 / float(w.length)))
    worst = max(sum(w.capacity(k) for k in range(i, i + per)) for i in range(k0, k0 + n))
    assert worst <= max(1, per_second) + 1


def test_a_rate_below_one_gets_windows_of_one_token() -> None:
    w = Windows.for_rate(0.3)
    assert float(w.length) == 4.0  # ceil(1 / 0.3)
    caps = [w.capacity(k) for k in range(100, 110)]
    assert set(caps) <= {0, 1, 2} and sum(caps) == 12  # 0.3/s over 40 s
    assert w.capacity(w.next_with_tokens(100)) > 0


# --- one process -----------------------------------------------------------------------


async def test_unlimited_vendors_never_wait() -> None:
    clock = FakeTime(START)
    lim = limiter(clock, {"mailgun": 5})
    for _ in range(1000):
        assert lim.try_acquire("amazon")
    assert clock.now == START


async def test_a_limit_of_50_holds_in_every_sliding_second_with_many_waiters() -> None:
    clock = FakeTime(START)
    lim = limiter(clock, {"mailgun": 50})
    granted = await drive(lim, clock, "mailgun", senders=40, seconds=5.0)
    assert max_in_any_second(granted) <= 53
    assert 245 <= len(granted) <= 253


async def test_a_fractional_limit_spaces_single_sends() -> None:
    clock = FakeTime(START)
    lim = limiter(clock, {"smtp": 0.5})
    granted = await drive(lim, clock, "smtp", senders=3, seconds=20.0)
    assert len(granted) == 10
    assert max_in_any_second(granted) == 1


async def test_leased_tokens_expire_with_their_window() -> None:
    clock = FakeTime(START - START % 1)  # the start of a window
    lim = limiter(clock, {"mailgun": 50}, prefetch=1.0)
    assert await lim.acquire("mailgun")  # leases the whole window: 2 or 3 tokens
    assert lim.try_acquire("mailgun")  # a leased token, no wait
    clock.advance(0.05)  # the next window: what was left is gone
    assert not lim.try_acquire("mailgun")


async def test_acquire_gives_up_after_its_bound_without_a_token() -> None:
    clock = FakeTime(START)
    lim = limiter(clock, {"smtp": 0.1})  # one token per 10 s window
    assert await lim.acquire("smtp")
    assert not await lim.acquire("smtp", within=2.0)
    assert clock.now - START < 2.0  # it did not sleep past its bound to find out


async def test_a_throttle_halves_the_rate_which_recovers_over_tens_of_seconds() -> None:
    clock = FakeTime(START)
    lim = limiter(clock, {"mailgun": 50}, recovery_s=30.0)
    assert lim.slow_down("mailgun") == pytest.approx(25.0)
    assert lim.slow_down("mailgun") == pytest.approx(12.5)  # a repeat halves again
    granted = await drive(lim, clock, "mailgun", senders=20, seconds=1.0)
    assert len(granted) <= 14
    clock.now = START + 13.0  # 0.25 + 13/30 of the way back
    assert lim.rate("mailgun") == pytest.approx(50 * 0.65)
    clock.advance(30.0)
    assert lim.rate("mailgun") == pytest.approx(50.0)


async def test_a_throttled_vendor_without_a_limit_gets_a_temporary_one_then_none() -> None:
    clock = FakeTime(START)
    lim = limiter(clock, {}, recovery_s=30.0)
    for i in range(400):  # 100/s for 4 s
        clock.now = START + i / 100
        assert lim.try_acquire("sparkpost")
    assert lim.slow_down("sparkpost") == pytest.approx(50.0, rel=0.1)
    granted = await drive(lim, clock, "sparkpost", senders=30, seconds=2.0)
    assert max_in_any_second(granted) <= 55
    clock.advance(40.0)
    assert lim.rate("sparkpost") is None
    assert lim.try_acquire("sparkpost")


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="above 0"):
        RateLimiter({"mailgun": 0})


# --- shared through MongoDB ------------------------------------------------------------


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[MailStore]:
    async with MailStore(settings) as s:
        yield s
        await s.rate_windows.drop()


async def test_two_limiters_on_one_store_share_the_limit(store: MailStore) -> None:
    clock = FakeTime(START)
    one = limiter(clock, {"mailgun": 50}, store=store)
    two = limiter(clock, {"mailgun": 50}, store=store)
    await one.start()
    a, b = await asyncio.gather(
        drive(one, clock, "mailgun", senders=20, seconds=2.0),
        drive(two, clock, "mailgun", senders=20, seconds=2.0),
    )
    both = a + b
    assert a and b, "each process gets tokens"
    assert max_in_any_second(both) <= 53
    assert len(both) <= 103
    # the windows' shared counts were taken, and never beyond what a window holds
    windows = Windows.for_rate(50)
    async for doc in store.rate_windows.find({}):
        k = int(str(doc["_id"]).split(":")[1])
        granted_in_k = sum(1 for t in both if windows.index(t) == k)
        assert granted_in_k <= windows.capacity(k)


async def test_without_mongodb_nothing_is_granted(settings: Settings) -> None:
    class Down(MailStore):
        async def count_sends(self, key: str, n: int, *, ends: float) -> int:
            raise AutoReconnect("connection refused")

    clock = FakeTime(START)
    lim = limiter(clock, {"mailgun": 50}, store=Down(settings))
    assert not await lim.acquire("mailgun", within=0.5)


# --- configuration ---------------------------------------------------------------------


def config(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "mailer.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


def test_limits_come_from_the_vendor_sections_and_the_simulation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAILER_ENV", raising=False)
    settings = config(
        tmp_path,
        "[simulation]\nmax_per_second = {sparkpost = 0.5}\n"
        '[vendors.mailgun]\ndomain = "mg.example.com"\napi_key = "k"\nmax_per_second = 50\n'
        '[vendors.sparkpost]\napi_key = "k"\nmax_per_second = 10\n',
    )
    assert settings.rate_limits() == {"mailgun": 50.0, "sparkpost": 0.5}  # the stand-in's wins
    monkeypatch.setenv("MAILER_ENV", "production")
    production = config(tmp_path, '[vendors.mailgun]\ndomain = "d"\napi_key = "k"\nmax_per_second = 14\n')
    assert production.rate_limits() == {"mailgun": 14.0}
    monkeypatch.setenv("MAILER_SIMULATION__MAX_PER_SECOND", '{"mailgun": 3}')  # ignored in production
    assert config(tmp_path, '[vendors.mailgun]\ndomain = "d"\napi_key = "k"\n').rate_limits() == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[simulation]\nmax_per_second = {mailgunn = 5}\n", "unknown vendor mailgunn"),
        ("[simulation]\nmax_per_second = {mailgun = 0}\n", "greater than 0"),
        ('[vendors.smtp]\nhost = "h"\nmax_per_second = -1\n', "vendors.smtp.max_per_second"),
    ],
)
def test_unusable_limits_stop_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.delenv("MAILER_ENV", raising=False)
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, text)


async def test_tokens_are_leased_for_the_window_current_when_a_slow_answer_comes_back(
    settings: Settings,
) -> None:
    clock = FakeTime(START)

    class Slow(MailStore):
        """MongoDB answering after more than a window (a busy server)."""

        async def count_sends(self, key: str, n: int, *, ends: float) -> int:
            clock.advance(0.06)
            return n  # every window fresh: all that was asked is granted

    async with Slow(settings) as store:
        lim = limiter(clock, {"mailgun": 50}, store=store)
        granted = await drive(lim, clock, "mailgun", senders=10, seconds=3.0)
    # One lease at a time: about a window's tokens per answer (2.5 / 0.06 s) once it has
    # learnt the delay; leasing only for the window of the request, every token was lost.
    assert len(granted) >= 45, "tokens arriving after their window were all lost"
    assert max_in_any_second(granted) <= 53
