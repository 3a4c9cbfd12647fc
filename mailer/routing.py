"""Which vendor sends a mail: round robin by job id, with circuit breakers shared through MongoDB.

Round robin is by the beanstalkd job id over the vendors available *now*, in the configured
order: ``available[job_id % len(available)]``, then the next ones in that list (wrapping)
on failure. Job ids are consecutive, so 4,000 jobs over 4 healthy vendors are 1,000 each,
and with one vendor down the other three share its load evenly.

A vendor that fails (transient or auth error) is *open* (unavailable) for the cooldown, or
longer if it asked (``Retry-After``). The mark goes to a small MongoDB collection so every
consumer process skips it; each process refreshes its view every few seconds and whenever
it marks a vendor, never with a read per mail. After the cooldown the vendor is
*half-open*: this process lets one real send through as a probe; success closes it for
everyone, failure opens it for another cooldown.

A vendor that *throttles* us (429, SES "Maximum sending rate exceeded", an SMTP rate reply)
is not down: it is paused for its ``Retry-After``, or for a default that doubles on repeats
(1, 2, 4 ... ``throttle_cap_s``), far below the cooldown, then back in rotation for everyone
at once, without a probe; and its send rate is lowered for a while (:mod:`mailer.ratelimit`).
The pause is shared like any mark; its reason starts with :data:`THROTTLE_PREFIX`, which
tells the other processes that no probe is due when it runs out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pymongo.errors import PyMongoError

from mailer.errors import VendorAuthError, VendorError
from mailer.lifecycle import stop_tasks
from mailer.ratelimit import RateLimiter
from mailer.store import MailStore
from mailer.vendors.base import Vendor

log = logging.getLogger("mailer.routing")
Clock = Callable[[], float]
THROTTLE_PREFIX = "throttled: "


@dataclass(slots=True)
class _Breaker:
    until: float = 0.0  # unavailable until this epoch time; 0 = closed
    reason: str = ""
    probing: bool = False  # a half-open probe of this process is in flight
    probe: bool = True  # the end of the mark needs a probe (an outage's; a throttle's does not)
    throttles: int = 0  # throttles in a row (no success between): the default pause grows


class VendorRegistry:
    """The vendors of one consumer process and their availability.

    ``store`` may be None (tests, single-process tools): marks then stay local.
    ``clock`` returns epoch seconds; tests inject one to cross cooldowns without sleeping.
    """

    def __init__(
        self,
        vendors: Sequence[Vendor],
        *,
        store: MailStore | None = None,
        cooldown_s: float = 600.0,
        refresh_s: float = 5.0,
        clock: Clock = time.time,
        unexpected_marks: int = 5,
        unexpected_window_s: float = 60.0,
        limiter: RateLimiter | None = None,
        throttle_base_s: float = 1.0,
        throttle_cap_s: float = 30.0,
    ) -> None:
        if not vendors:
            raise ValueError("a registry needs at least one vendor")
        names = [v.name for v in vendors]
        if len(set(names)) != len(names):
            raise ValueError(f"vendor names must be unique: {names}")
        self.vendors = list(vendors)
        self.store = store
        self.cooldown_s = cooldown_s
        self.refresh_s = refresh_s
        self.clock = clock
        self._breakers = {v.name: _Breaker() for v in self.vendors}
        self.unexpected_marks = unexpected_marks
        self.unexpected_window_s = unexpected_window_s
        self._unexpected: dict[str, dict[str, float]] = {}  # vendor -> {mail id: when}
        self.limiter = limiter
        self.throttle_base_s = throttle_base_s
        self.throttle_cap_s = throttle_cap_s
        self._refresh_task: asyncio.Task[None] | None = None
        self._pending_writes: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the vendors, load the shared marks and keep them fresh."""
        for vendor in self.vendors:
            await vendor.connect()
        await self.refresh()
        if self.store is not None and self._refresh_task is None:
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        task, self._refresh_task = self._refresh_task, None
        if task is not None:
            await stop_tasks([task])
        if self._pending_writes:
            await asyncio.gather(*self._pending_writes, return_exceptions=True)
        for vendor in self.vendors:
            try:
                await vendor.close()
            except Exception:
                log.exception("closing vendor %s failed", vendor.name)

    async def refresh(self) -> None:
        """Adopt the shared marks: another process may have opened or closed a breaker, and
        an operator may have cleared one (``mailer vendors --reset``) or deleted its document;
        a vendor with no document is available. While this process's own marks are still
        being written, a mark is only ever raised, so a read that overtakes the write cannot
        take a just-failed vendor back."""
        if self.store is None:
            return
        marks = await self.store.vendor_marks()
        writing = bool(self._pending_writes)
        for name, breaker in self._breakers.items():
            until, reason = marks.get(name, (0.0, ""))
            if writing and until < breaker.until:
                continue
            breaker.until, breaker.reason = until, reason
            breaker.probe = not reason.startswith(THROTTLE_PREFIX)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except PyMongoError as exc:
                log.warning("could not refresh vendor availability from MongoDB: %s", type(exc).__name__)

    # --- routing -----------------------------------------------------------------------

    def is_available(self, name: str, now: float | None = None) -> bool:
        breaker = self._breakers[name]
        now = self.clock() if now is None else now
        return breaker.until <= now and not breaker.probing

    def available(self) -> list[Vendor]:
        now = self.clock()
        return [v for v in self.vendors if self.is_available(v.name, now)]

    def plan(self, job_id: int) -> list[Vendor]:
        """Vendors to try for this job, in order: the round-robin pick, then the next ones."""
        available = self.available()
        if not available:
            return []
        start = job_id % len(available)
        return available[start:] + available[:start]

    def next_available_at(self) -> float:
        """When the first open breaker closes (for a back-off that waits for a vendor)."""
        return min(b.until for b in self._breakers.values())

    def begin(self, vendor: Vendor) -> bool:
        """Claim the right to send through ``vendor`` now; False when it went away meanwhile.

        A vendor past its cooldown is half-open: the first caller becomes its probe and
        others skip it until the probe reports.
        """
        breaker = self._breakers[vendor.name]
        now = self.clock()
        if breaker.until > now or breaker.probing:
            return False
        if breaker.until > 0 and breaker.probe:
            breaker.probing = True
            log.info("vendor %s: cooldown over, probing with one send", vendor.name)
        return True

    def succeeded(self, vendor: Vendor) -> None:
        breaker = self._breakers[vendor.name]
        breaker.throttles = 0
        # Only the half-open probe closes a breaker: a send that began before the vendor
        # was marked (by this process or another) and succeeds late says nothing about now.
        if breaker.probing:
            log.info("vendor %s: probe succeeded, available again", vendor.name)
            breaker.until, breaker.reason, breaker.probing = 0.0, "", False
            if self.store is not None:
                self._write(self.store.clear_vendor(vendor.name))

    def failed(self, vendor: Vendor, error: VendorError) -> None:
        """Open the breaker for the cooldown (or the vendor's Retry-After, if longer)."""
        breaker = self._breakers[vendor.name]
        retry_after = getattr(error, "retry_after", None) or 0.0
        until = self.clock() + max(self.cooldown_s, retry_after)
        breaker.until, breaker.reason, breaker.probing = until, error.reason, False
        breaker.probe = True
        if isinstance(error, VendorAuthError):
            log.error(
                "vendor %s refused our credentials or account (%s): unavailable for %.0f s; "
                "fix [vendors.%s] in the configuration",
                vendor.name, error.reason, until - self.clock(), vendor.name,
            )  # fmt: skip
        else:
            log.warning(
                "vendor %s failed (%s): unavailable for %.0f s",
                vendor.name,
                error.reason,
                until - self.clock(),
            )
        if self.store is not None:
            self._write(self.store.mark_vendor(vendor.name, until, error.reason))

    def throttled(self, vendor: Vendor, error: VendorError) -> float:
        """The vendor asked us to slow down: pause it briefly and lower its send rate, but
        keep it in rotation (no cooldown, no probe). Returns the pause in seconds.

        The pause is the vendor's ``Retry-After``, else ``throttle_base_s`` doubled for each
        throttle in a row, capped at ``throttle_cap_s``. A longer outage mark stands (a
        send begun before it was marked may be throttled late); a throttled probe proves the
        vendor is up, so it ends the outage.
        """
        breaker = self._breakers[vendor.name]
        now = self.clock()
        breaker.throttles += 1
        asked = getattr(error, "retry_after", None)
        retry_after = float(asked) if asked else 0.0
        if retry_after <= 0:
            retry_after = min(self.throttle_cap_s, self.throttle_base_s * 2 ** (breaker.throttles - 1))
        until = now + retry_after
        if self.limiter is not None:
            self.limiter.slow_down(vendor.name)
        if breaker.probe and breaker.until > until and not breaker.probing:
            return breaker.until - now  # an outage mark outlasts this pause: it stands
        reason = THROTTLE_PREFIX + error.reason
        breaker.until, breaker.reason, breaker.probing, breaker.probe = until, reason, False, False
        log.info("vendor %s throttled us (%s): paused for %.1f s", vendor.name, error.reason, retry_after)
        if self.store is not None:
            self._write(self.store.mark_vendor_throttled(vendor.name, until, reason))
        return retry_after

    def unexpected(self, vendor: Vendor, mail_id: str, reason: str) -> bool:
        """An adapter raised something that is not a vendor error (a bug, or a mail no check
        foresaw). That is the mail's problem first: the vendor is marked only once
        ``unexpected_marks`` distinct mails failed so within ``unexpected_window_s``, so one
        odd mail never takes a vendor away from every other mail. True when it was marked."""
        now = self.clock()
        seen = self._unexpected.setdefault(vendor.name, {})
        seen[mail_id] = now
        for old in [m for m, t in seen.items() if now - t > self.unexpected_window_s]:
            del seen[old]
        if len(seen) < self.unexpected_marks:
            self.released(vendor)
            return False
        seen.clear()
        self.failed(vendor, VendorError(vendor.name, f"{self.unexpected_marks} mails failed alike: {reason}"))
        return True

    def released(self, vendor: Vendor) -> None:
        """A begun send ended without a verdict (permanent error, cancel): end any probe."""
        self._breakers[vendor.name].probing = False

    def _write(self, coro: Awaitable[object]) -> None:
        """Share a mark in the background: a delivery never waits on it."""

        async def run() -> None:
            try:
                await coro
            except PyMongoError as exc:
                log.warning("could not share a vendor mark through MongoDB: %s", type(exc).__name__)

        task = asyncio.get_running_loop().create_task(run())
        self._pending_writes.add(task)
        task.add_done_callback(self._pending_writes.discard)

    def snapshot(self) -> dict[str, tuple[float, str]]:
        """``{name: (unavailable_until, reason)}`` as this process sees it now."""
        return {name: (b.until, b.reason) for name, b in self._breakers.items()}
