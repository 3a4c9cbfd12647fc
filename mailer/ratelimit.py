"""Per-vendor send rates held by every consumer process together, and the slow-down after a throttle.

Windows, not a per-second count: a vendor limited to ``r`` sends a second gets windows of
``1/w`` seconds (``w`` = min(20, floor(r)) windows a second; for rates below 1/s, windows of
``ceil(1/r)`` seconds), and window ``k`` holds ``floor((k+1)*q) - floor(k*q)`` tokens, ``q``
being the tokens of one window on average (exact fractions: every process computes the same
numbers). Fixed 1-second windows would let 2r through around a window boundary; with 20
windows a second any sliding second sees at most ``r`` plus one window's tokens.

Shared, without a round trip per mail: a process that needs tokens leases a block of them for
the current window from a counter in MongoDB (one atomic ``$inc``; see
``MailStore.count_sends``) and hands them to its waiting sends locally. A window's tokens
are good only in that window, never carried over, so no process can save up a burst.

Throttles: after a vendor's throttle the effective rate is halved (down to 1/20), then climbs
back linearly over ``recovery_s``. For a vendor without a configured limit the reduced rate
is taken from what this process was sending it just before, and is held locally (each
throttled process slows itself down); the configured ones stay shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction

from pymongo.errors import PyMongoError

from mailer.store import MailStore

log = logging.getLogger("mailer.ratelimit")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

MAX_WINDOWS_PER_SECOND = 20
SLOWDOWN_FACTOR = 0.5
MIN_FACTOR = 0.05
FACTOR_STEP = 20  # the factor is quantised to 1/20 so window sizes stay exact fractions
OBSERVE_S = 5  # seconds of sends that give an unlimited vendor's rate before a throttle
MIN_TEMPORARY_RATE = 1.0


@dataclass(frozen=True, slots=True)
class Windows:
    """How one rate is cut into windows: their length and the tokens of each."""

    length: Fraction  # seconds
    per_window: Fraction  # tokens of one window on average

    @classmethod
    def for_rate(cls, rate: float, max_per_second: int = MAX_WINDOWS_PER_SECOND) -> Windows:
        exact = Fraction(repr(rate))
        if exact >= 1:
            length = Fraction(1, min(max_per_second, math.floor(exact)))
        else:
            length = Fraction(math.ceil(1 / exact))
        return cls(length, exact * length)

    def index(self, now: float) -> int:
        return math.floor(now / self.length)

    def start(self, k: int) -> float:
        return float(k * self.length)

    def capacity(self, k: int) -> int:
        return math.floor((k + 1) * self.per_window) - math.floor(k * self.per_window)

    def next_with_tokens(self, k: int) -> int:
        """The first window after ``k`` that holds a token (at most ``1/per_window`` ahead)."""
        k += 1
        while self.capacity(k) == 0:
            k += 1
        return k


@dataclass(slots=True)
class _Gate:
    """One vendor's state in this process."""

    name: str
    limit: float | None  # the configured (shared) limit
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    window: int = -1  # the window the tokens below belong to
    tokens: int = 0
    exhausted: int = -1  # a window whose shared count is known to be used up
    local_used: int = 0  # sends of ``window`` when the limit is held locally
    waiting: int = 0
    rtt: float = 0.0  # how long a lease takes to come back (moving average), in seconds
    factor: float = 1.0  # the slow-down after a throttle, at ``slowed_at``
    slowed_at: float = 0.0
    temporary: float | None = None  # base of a temporary limit (vendor without a limit)
    sent: deque[tuple[int, int]] = field(default_factory=deque)  # (epoch second, sends)


class RateLimiter:
    """Send-rate limits of one consumer process's vendors.

    ``limits`` maps vendor names to ``max_per_second``; other vendors are unlimited until
    they throttle. ``store`` None keeps every count in this process (tests, one process).
    ``clock`` is epoch seconds (windows must line up across processes) and ``sleep`` the
    wait, both injectable so tests never sleep through real windows.
    """

    def __init__(
        self,
        limits: Mapping[str, float],
        *,
        store: MailStore | None = None,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        max_wait_s: float = 30.0,
        recovery_s: float = 30.0,
        prefetch: float = 0.5,
        cleanup_s: float = 60.0,
    ) -> None:
        for name, rate in limits.items():
            if not rate > 0:
                raise ValueError(f"max_per_second of {name!r} must be above 0, not {rate!r}")
        self.store = store
        self.clock = clock
        self.sleep = sleep
        self.max_wait_s = max_wait_s
        self.recovery_s = recovery_s
        self.prefetch = prefetch
        self.cleanup_s = cleanup_s
        self._gates = {name: _Gate(name, rate) for name, rate in limits.items()}
        self._last_cleanup = 0.0
        self._last_warning = 0.0
        self._cleaning: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        limits = {g.name: g.limit for g in self._gates.values() if g.limit is not None}
        return f"<RateLimiter limits={limits} shared={self.store is not None}>"

    async def start(self) -> None:
        """Create the index the clean-up of old windows uses (once per process)."""
        if self.store is not None and any(g.limit is not None for g in self._gates.values()):
            await self.store.ensure_rate_indexes()

    @property
    def active(self) -> bool:
        """Whether any vendor is limited now (configured, or for a while after a throttle):
        when none is, a send never waits for a token and its loop need not watch for it."""
        return any(g.limit is not None or g.temporary is not None for g in self._gates.values())

    # --- the send path -----------------------------------------------------------------

    def rate(self, name: str, now: float | None = None) -> float | None:
        """The rate in force for ``name`` now (sends per second), or None: no limit."""
        gate = self._gate(name)
        now = self.clock() if now is None else now
        base = gate.limit if gate.limit is not None else gate.temporary
        if base is None:
            return None
        factor = self._factor(gate, now)
        if gate.limit is None and factor >= 1.0:
            gate.temporary = None  # recovered: the temporary limit is lifted
            return None
        return base * factor

    def try_acquire(self, name: str) -> bool:
        """A token of the current window already leased by this process, without waiting or
        a round trip; False when there is none now (``acquire`` then waits for one)."""
        gate = self._gate(name)
        now = self.clock()
        rate = self.rate(name, now)
        if rate is None:
            self._count(gate, now)
            return True
        return self._take(gate, Windows.for_rate(rate).index(now), now)

    async def acquire(self, name: str, *, within: float | None = None) -> bool:
        """Wait for a token to send through ``name`` once; False when none came within
        ``within`` seconds (default ``max_wait_s``): the caller may then try another vendor
        or put the mail off, without counting it as a failure of either."""
        if self.try_acquire(name):
            return True
        gate = self._gate(name)
        deadline = self.clock() + (self.max_wait_s if within is None else within)
        gate.waiting += 1
        try:
            while True:
                now = self.clock()
                rate = self.rate(name, now)
                if rate is None:
                    self._count(gate, now)
                    return True
                windows = Windows.for_rate(rate)
                if await self._lease_and_take(gate, windows, now):
                    return True
                k = windows.index(self.clock())
                ahead = gate.window if gate.window > k and gate.tokens else windows.next_with_tokens(k)
                wake = windows.start(ahead)
                if wake > deadline:
                    return False
                await self.sleep(max(0.0, wake - self.clock()))
        finally:
            gate.waiting -= 1

    # --- throttles ---------------------------------------------------------------------

    def slow_down(self, name: str) -> float:
        """The vendor throttled us: halve its rate (recovering over ``recovery_s``); returns
        the new rate. A vendor without a limit gets a temporary one below what this process
        was sending it."""
        gate = self._gate(name)
        now = self.clock()
        if gate.limit is None and gate.temporary is None:
            gate.temporary = max(MIN_TEMPORARY_RATE, self._observed(gate, now))
        gate.factor = max(MIN_FACTOR, self._factor(gate, now) * SLOWDOWN_FACTOR)
        gate.slowed_at = now
        rate = self.rate(name, now)
        assert rate is not None
        log.info("vendor %s throttled us: sending at most %.1f/s for a while", name, rate)
        return rate

    # --- inside ------------------------------------------------------------------------

    def _gate(self, name: str) -> _Gate:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = _Gate(name, None)
        return gate

    def _factor(self, gate: _Gate, now: float) -> float:
        """The slow-down now, in steps of 1/FACTOR_STEP (exact window sizes)."""
        if gate.factor >= 1.0:
            return 1.0
        grown = gate.factor + max(0.0, now - gate.slowed_at) / self.recovery_s
        return min(1.0, max(MIN_FACTOR, math.floor(grown * FACTOR_STEP) / FACTOR_STEP))

    def _count(self, gate: _Gate, now: float) -> None:
        """Remember a send (a granted token), for the observed rate of :meth:`slow_down`."""
        second = int(now)
        if gate.sent and gate.sent[-1][0] == second:
            gate.sent[-1] = (second, gate.sent[-1][1] + 1)
        else:
            gate.sent.append((second, 1))
            while gate.sent and gate.sent[0][0] < second - OBSERVE_S:
                gate.sent.popleft()

    def _observed(self, gate: _Gate, now: float) -> float:
        recent = [(s, n) for s, n in gate.sent if s >= int(now) - OBSERVE_S]
        if not recent:
            return 0.0
        span = min(float(OBSERVE_S), max(1.0, now - recent[0][0]))
        return sum(n for _, n in recent) / span

    def _take(self, gate: _Gate, k: int, now: float) -> bool:
        if gate.window == k and gate.tokens > 0:
            gate.tokens -= 1
            self._count(gate, now)
            return True
        return False

    async def _lease_and_take(self, gate: _Gate, windows: Windows, now: float) -> bool:
        """Take a token of the current window, leasing a block first if this process has none
        left and the window is not known to be used up. One lease at a time per vendor.

        The lease is for the window that will be current when its answer comes back (a busy
        MongoDB can take longer than a window): tokens of a window already over are lost."""
        if self._take(gate, windows.index(now), now):
            return True
        if not self._may_lease(gate, windows, now):
            return False
        async with gate.lock:
            now = self.clock()
            if self._take(gate, windows.index(now), now):
                return True
            if self._may_lease(gate, windows, now):
                target = windows.index(now + gate.rtt)
                await self._lease(gate, windows, target)
                gate.rtt = 0.8 * gate.rtt + 0.2 * max(0.0, self.clock() - now)
            now = self.clock()
            return self._take(gate, windows.index(now), now)

    @staticmethod
    def _may_lease(gate: _Gate, windows: Windows, now: float) -> bool:
        """No tokens are waiting for a coming window, and the target is not used up."""
        if gate.window > windows.index(now) and gate.tokens > 0:
            return False
        return gate.exhausted < windows.index(now + gate.rtt)

    async def _lease(self, gate: _Gate, windows: Windows, k: int) -> None:
        capacity = windows.capacity(k)
        want = min(capacity, max(gate.waiting, math.ceil(capacity * self.prefetch), 1))
        if gate.window != k:
            gate.window, gate.tokens, gate.local_used = k, 0, 0
        if self.store is None or gate.limit is None:
            before = gate.local_used  # a temporary limit is this process's own
        else:
            shared = await self._count_shared(gate, windows, k, want)
            if shared is None:
                return
            before = shared
        granted = max(0, min(want, capacity - before))
        gate.local_used += granted
        if gate.window == k:
            gate.tokens += granted
        if before + want >= capacity:
            gate.exhausted = k

    async def _count_shared(self, gate: _Gate, windows: Windows, k: int, want: int) -> int | None:
        """Add ``want`` to the window's shared count; the count before it, or None when
        MongoDB cannot be asked (then nothing is granted: better late than over the limit)."""
        assert self.store is not None
        ends = windows.start(k + 1)
        try:
            after = await self.store.count_sends(f"{gate.name}:{k}", want, ends=ends)
        except PyMongoError as exc:
            now = self.clock()
            if now - self._last_warning >= 5.0:
                self._last_warning = now
                log.warning(
                    "vendor %s: cannot lease send tokens from MongoDB (%s); its sends wait",
                    gate.name,
                    type(exc).__name__,
                )
            return None
        self._maybe_clean(ends)
        return after - want

    def _maybe_clean(self, now: float) -> None:
        """Now and then, delete ended windows (in the background: no send waits on it)."""
        if self.store is None or now - self._last_cleanup < self.cleanup_s:
            return
        self._last_cleanup = now
        store = self.store

        async def clean() -> None:
            with contextlib.suppress(PyMongoError):
                await store.drop_rate_windows(ended_before=now - self.cleanup_s)

        task = asyncio.get_running_loop().create_task(clean())
        self._cleaning = task  # a reference, so the task is not collected mid-way
