"""Session fixtures: the real beanstalkd and nx-27017 that `make test` started.

Every test that touches the services gets a tube and collections named uniquely for this
run (``mailer_test_<run>_<n>``), so tests never see production data nor each other's, and
the fixtures clear what they used afterwards.
"""

from __future__ import annotations

import gc
import itertools
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from mailer.beanstalk import Beanstalk
from mailer.config import Settings, load_settings
from mailer.errors import BeanstalkServerError
from mailer.store import MailStore

RUN_ID = uuid.uuid4().hex[:8]
_counter = itertools.count(1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """No automatic garbage collection while a test body runs; it happens between tests.

    Late in a session this interpreter holds enough objects that one full collection stops
    it for 0.5-0.8 s (measured with ``gc.callbacks`` over ``make test``), which lands inside
    whichever timed section triggered it: a 0.5 s deadline then reads as 1.3 s. Tests that
    need a collection call ``gc.collect()``, which works while automatic collection is off.
    """
    gc.disable()
    try:
        return (yield)
    finally:
        gc.enable()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    os.environ.pop("MAILER_ENV", None)
    settings = load_settings(test=False)
    b = settings.beanstalkd
    mongo_port = int(os.environ.get("MAILER_MONGO_PORT", "27017"))
    for name, port in (("beanstalkd", b.port), ("nx-27017", mongo_port)):
        if not _port_open(b.host, port):
            pytest.exit(f"{name} is not listening on {b.host}:{port}: run the tests with 'make test'", 2)
    return settings


async def drain_tube(settings: Settings) -> None:
    """Delete every job of the settings' tube: ready, delayed and buried."""
    b = settings.beanstalkd
    async with Beanstalk(b.host, b.port) as bs:
        await bs.use(b.tube)
        await bs.watch(b.tube)
        await bs.ignore("default")
        for peek in (bs.peek_ready, bs.peek_delayed, bs.peek_buried):
            while (job := await peek()) is not None:
                try:
                    await bs.delete(job.id)
                except BeanstalkServerError:
                    break


MakeSettings = Callable[..., Awaitable[Settings]]


@pytest.fixture
async def make_settings(base_settings: Settings) -> AsyncIterator[MakeSettings]:
    """Build test settings on a fresh tube and collections; cleaned up after the test."""
    made: list[Settings] = []

    async def make(**updates: object) -> Settings:
        settings = base_settings.for_test(f"_{RUN_ID}_{next(_counter)}")
        if updates:
            settings = settings.model_copy(update=updates)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        await drain_tube(settings)
        async with MailStore(settings) as store:
            await store.mails.drop()
            await store.vendor_status.drop()
            # And what is named after the mails collection (outbox, events, suppressions...).
            db, prefix = store.mails.database, settings.mongodb.collection + "_"
            for name in await db.list_collection_names():
                if name.startswith(prefix):
                    await db[name].drop()
            await store.consumers.delete_many({"tube": settings.beanstalkd.tube})


@pytest.fixture
async def settings(make_settings: MakeSettings) -> Settings:
    return await make_settings()
