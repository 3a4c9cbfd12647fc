"""The producer's copy of the suppression list (``mailer.suppression_view``): the store's
generation round-trips with MongoDB's documented result, the view answers from memory only
while its lease holds, and a change that has returned is seen by every send after it, in
this process and in others."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from helpers import FakeClock, mail

from mailer.config import Settings, SuppressionSettings
from mailer.errors import RecipientSuppressed
from mailer.producer import Producer
from mailer.store import MailStore
from mailer.suppression_view import SuppressionView

LEASE_S = 0.2


def with_lease(settings: Settings, lease_s: float = LEASE_S) -> Settings:
    return settings.model_copy(update={"suppression": SuppressionSettings(lease_s=lease_s)})


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[MailStore]:
    async with MailStore(with_lease(settings)) as s:
        yield s


# --- the store's side: generation and load -------------------------------------------------


async def test_every_change_bumps_the_generation_and_nothing_else_does(store: MailStore) -> None:
    assert await store.suppression_generation() == 0  # no change yet: no document
    assert await store.add_suppression("a@example.com", reason="manual")
    assert await store.suppression_generation() == 1
    assert not await store.add_suppression("a@example.com", reason="again")  # already there
    assert await store.suppression_generation() == 1
    assert (
        await store.add_suppressions(["b@example.com", "c@example.com", "a@example.com"], reason="import")
        == 2
    )
    assert await store.suppression_generation() == 2  # one bump per write, not per address
    assert await store.add_suppressions(["a@example.com"], reason="import") == 0
    assert await store.suppression_generation() == 2
    assert await store.remove_suppression("b@example.com")
    assert not await store.remove_suppression("b@example.com")
    assert await store.suppression_generation() == 3
    assert sorted(await store.all_suppressions(10)) == ["a@example.com", "c@example.com"]
    assert len(await store.all_suppressions(1)) == 1


async def test_a_change_returns_only_after_the_lease(store: MailStore) -> None:
    t0 = time.monotonic()
    await store.add_suppression("slow@example.com", reason="manual")
    assert time.monotonic() - t0 >= LEASE_S
    t0 = time.monotonic()
    await store.add_suppression("quick@example.com", reason="manual", settle=False)
    assert time.monotonic() - t0 < LEASE_S  # a caller adding many settles once at the end


# --- the view, with a scripted store ----------------------------------------------------------


class ListStore:
    def __init__(self, addresses: Sequence[str] = ()) -> None:
        self.addresses = set(addresses)
        self.generation = 1
        self.queries = 0
        self.loads = 0
        self.reads = 0  # of the generation
        self.fail = False
        self.announced: list[float] = []

    async def suppressed_among(self, addresses: Sequence[str]) -> set[str]:
        self.queries += 1
        return {a for a in addresses if a in self.addresses}

    async def suppression_generation(self) -> int:
        self.reads += 1
        if self.fail:
            from pymongo.errors import AutoReconnect

            raise AutoReconnect("MongoDB away")
        return self.generation

    async def all_suppressions(self, limit: int) -> list[str]:
        self.loads += 1
        return sorted(self.addresses)[:limit]

    async def announce_suppression_lease(self, lease_s: float) -> None:
        if self.fail:
            from pymongo.errors import AutoReconnect

            raise AutoReconnect("MongoDB away")
        self.announced.append(lease_s)

    def change(self, *, add: str = "", remove: str = "") -> None:
        self.addresses = (self.addresses | {add} if add else self.addresses) - {remove}
        self.generation += 1


async def test_the_view_answers_from_memory_while_its_lease_holds() -> None:
    clock, listed = FakeClock(0.0), ListStore(["x@example.com"])
    view = SuppressionView(listed, lease_s=1.0, monotonic=clock)
    assert await view.suppressed_among(["x@example.com"]) == {"x@example.com"}
    assert listed.queries == 1  # never read yet: asked MongoDB
    await view.refresh()
    for _ in range(5):
        assert await view.suppressed_among(["x@example.com", "y@example.com"]) == {"x@example.com"}
    assert listed.queries == 1 and listed.loads == 1
    clock.advance(1.0)  # the lease ran out without a read
    assert await view.suppressed_among(["x@example.com"]) == {"x@example.com"} and listed.queries == 2


async def test_the_view_reloads_only_when_the_generation_moves() -> None:
    clock, listed = FakeClock(0.0), ListStore()
    view = SuppressionView(listed, lease_s=1.0, monotonic=clock)
    await view.refresh()
    await view.refresh()
    assert listed.loads == 1
    listed.change(add="new@example.com")
    await view.refresh()
    assert listed.loads == 2 and await view.suppressed_among(["new@example.com"]) == {"new@example.com"}
    listed.change(remove="new@example.com")
    await view.refresh()
    assert await view.suppressed_among(["new@example.com"]) == set() and listed.queries == 0


async def test_a_failed_read_keeps_only_the_lease_already_earned() -> None:
    clock, listed = FakeClock(0.0), ListStore(["x@example.com"])
    view = SuppressionView(listed, lease_s=1.0, monotonic=clock)
    await view.refresh()
    listed.fail = True
    clock.advance(0.5)
    with pytest.raises(Exception, match="away"):
        await view.refresh()
    assert view.trusted  # the first read's lease still holds
    clock.advance(0.6)
    assert not view.trusted
    await view.suppressed_among(["x@example.com"])
    assert listed.queries == 1


async def test_a_list_too_large_to_copy_is_queried() -> None:
    listed = ListStore([f"u{i}@example.com" for i in range(11)])
    view = SuppressionView(listed, lease_s=1.0, max_entries=10, monotonic=FakeClock(0.0))
    await view.refresh()
    assert view.too_large and not view.trusted
    assert await view.suppressed_among(["u1@example.com"]) == {"u1@example.com"} and listed.queries == 1


async def test_the_background_reads_keep_the_view_trusted() -> None:
    listed = ListStore(["x@example.com"])
    view = SuppressionView(listed, lease_s=0.15)
    view.start()
    try:
        await asyncio.sleep(0.4)  # several leases
        assert view.trusted
        listed.change(add="late@example.com")
        await asyncio.sleep(0.16)  # one lease: a read has come since
        assert await view.suppressed_among(["late@example.com"]) == {"late@example.com"}
        assert listed.queries == 0
    finally:
        await view.close()
    assert not view.trusted


async def test_an_idle_view_stops_reading_until_a_send_asks() -> None:
    """An idle process must not read the generation six times a second for nobody; the next
    send queries once (exact, as an untrusted view always is) and the reads resume."""
    listed = ListStore(["x@example.com"])
    view = SuppressionView(listed, lease_s=0.15, idle_after_s=0.3)
    view.start()
    try:
        await asyncio.sleep(0.5)
        assert view.paused and not view.trusted
        paused_at = listed.reads
        await asyncio.sleep(0.3)
        assert listed.reads == paused_at  # nothing read while nobody asked
        listed.change(add="late@example.com")
        assert await view.suppressed_among(["late@example.com"]) == {"late@example.com"}
        assert listed.queries == 1  # asked MongoDB: the copy was no longer trusted
        await asyncio.sleep(0.1)
        assert view.trusted and not view.paused and listed.reads > paused_at
        assert await view.suppressed_among(["late@example.com"]) == {"late@example.com"}
        assert listed.queries == 1
    finally:
        await view.close()


# --- end to end, on the local MongoDB ----------------------------------------------------------


async def test_a_send_after_a_change_returned_sees_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's add (here: another store) is seen by every send that starts after
    the add returned, though the sender checks its own copy and asks MongoDB nothing."""
    leased = with_lease(settings)
    async with Producer(leased) as producer, MailStore(leased) as other:
        queries = 0
        real = producer.store.suppressed_among

        async def counted(addresses: Sequence[str]) -> set[str]:
            nonlocal queries
            queries += 1
            return await real(addresses)

        monkeypatch.setattr(producer.store, "suppressed_among", counted)
        await asyncio.sleep(LEASE_S)  # the view has read the list
        for i in range(6):
            address = f"late{i}@example.com"
            assert await producer.send(mail(i, to=address))  # not listed yet
            await other.add_suppression(address, reason="bounced_hard")
            with pytest.raises(RecipientSuppressed):
                await producer.send(mail(i, to=address))
            await other.remove_suppression(address)
            assert await producer.send(mail(i, to=address))  # allowed again at once
        # 18 checks; the copy answered (all of them, unless a read of the list was late
        # on a loaded machine and the check asked MongoDB instead, as it must then).
        assert queries < 6


async def test_close_returns_though_a_read_swallows_the_cancel() -> None:
    """pymongo can swallow a cancel that lands inside a read (a CLI command hung at exit,
    its loop waiting on the view's task forever): the view stops at its own flag."""

    class Swallowing(ListStore):
        reading = asyncio.Event()

        async def suppression_generation(self) -> int:
            self.reading.set()
            with contextlib.suppress(asyncio.CancelledError):  # what the driver did
                await asyncio.sleep(30)
            return self.generation

    listed = Swallowing()
    view = SuppressionView(listed, lease_s=1.0)
    view.start()
    await listed.reading.wait()
    await asyncio.wait_for(view.close(), 3)


# --- leases differ between processes: writers wait out the longest announced -------------


async def test_a_view_announces_its_lease_before_it_first_trusts_and_again_later() -> None:
    from mailer.store import LEASE_ANNOUNCE_EVERY_S

    clock, listed = FakeClock(0.0), ListStore()
    view = SuppressionView(listed, lease_s=1.0, monotonic=clock)
    listed.fail = True
    with contextlib.suppress(Exception):
        await view.refresh()
    assert listed.announced == [] and not view.trusted  # not announced: never trusted
    listed.fail = False
    await view.refresh()
    assert listed.announced == [1.0] and view.trusted
    await view.refresh()
    assert listed.announced == [1.0]  # once per LEASE_ANNOUNCE_EVERY_S, not per read
    clock.advance(LEASE_ANNOUNCE_EVERY_S)
    await view.refresh()
    assert listed.announced == [1.0, 1.0]


async def test_a_writer_with_a_shorter_lease_waits_out_the_longest_announced(settings: Settings) -> None:
    """The sender trusts its copy for 0.6 s; the writer is configured with 0 (it queries per
    write itself) yet its add returns only once no sender can still trust a copy without it."""
    async with (
        MailStore(with_lease(settings, 0.6)) as sender_store,
        MailStore(with_lease(settings, 0.0)) as writer,
    ):
        view = SuppressionView(sender_store, lease_s=0.6)
        await view.refresh()  # announces 0.6, then trusts an empty copy
        assert view.trusted and await writer.longest_suppression_lease() == pytest.approx(0.6)
        t0 = time.monotonic()
        await writer.add_suppression("late@example.com", reason="manual")
        assert time.monotonic() - t0 >= 0.6
        assert not view.trusted or "late@example.com" in await view.suppressed_among(["late@example.com"])


async def test_stale_lease_announcements_are_ignored(settings: Settings) -> None:
    from mailer.store import LEASE_ANNOUNCED_FOR_S

    async with MailStore(with_lease(settings, 0.0)) as s:
        await s.announce_suppression_lease(5.0)
        assert await s.longest_suppression_lease() == 5.0
        old = {"$set": {"at": time.time() - LEASE_ANNOUNCED_FOR_S - 1}}
        await s.suppressions_state.update_one({"_id": "lease 5.0"}, old)
        assert await s.longest_suppression_lease() == 0.0  # that process is gone or configured anew
        t0 = time.monotonic()
        await s.add_suppression("x@example.com", reason="manual")  # no live lease: no wait
        assert time.monotonic() - t0 < 1.0
        assert await s.suppression_generation() == 1
        assert await s.longest_suppression_lease() == 0.0  # the generation document is not a lease
