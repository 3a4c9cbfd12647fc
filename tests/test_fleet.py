"""Several beanstalkd servers (mailer.fleet): spreading, failover, per-server job ids, the
sweep across servers; and the MongoDB write concern. Two private beanstalkd servers per test."""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bson import ObjectId
from helpers import (
    FakeClock,
    MakeSettings,
    OwnBeanstalkd,
    docs,
    fake_vendors,
    mail,
    running_consumer,
    wait_all_status,
    with_consumer,
)
from pydantic import SecretStr
from pymongo import WriteConcern

from mailer import cli
from mailer.beanstalk import Beanstalk
from mailer.config import Settings, load_settings
from mailer.consumer import Consumer
from mailer.errors import ConfigError, EnqueueError, NotFound
from mailer.fleet import SERVER_SHIFT, Fleet, fleet_job_id, server_of, split_job_id
from mailer.jobs import OwnedJob
from mailer.producer import Producer
from mailer.requeue import sweep
from mailer.store import MailStore


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[OwnBeanstalkd]]:
    servers = [OwnBeanstalkd(tmp_path / f"binlog{i}") for i in range(2)]
    for s in servers:
        s.binlog.mkdir()
        s.start()
    yield servers
    for s in servers:
        s.kill()


def on_pair(settings: Settings, pair: list[OwnBeanstalkd]) -> Settings:
    servers = tuple(f"127.0.0.1:{s.port}" for s in pair)
    b = settings.beanstalkd.model_copy(update={"servers": servers, "connect_timeout_s": 1.0})
    return settings.model_copy(update={"beanstalkd": b})


async def jobs_on(port: int, tube: str) -> int:
    """Every job ever put on ``tube`` at the server on ``port``."""
    async with Beanstalk("127.0.0.1", port) as bs:
        try:
            return int((await bs.stats_tube(tube))["total-jobs"])
        except NotFound:
            return 0


# --- configuration and ids ------------------------------------------------------------


def test_servers_entries_are_checked_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILER_BEANSTALKD__SERVERS", raising=False)
    path = tmp_path / "c.toml"
    path.write_text('[beanstalkd]\nservers = ["127.0.0.1:11300", "10.0.0.2"]\n')
    with pytest.raises(ConfigError, match=r"beanstalkd\.servers.*'10\.0\.0\.2' is not HOST:PORT"):
        load_settings(path)
    path.write_text('[beanstalkd]\nservers = ["a:1", "a:1"]\n')
    with pytest.raises(ConfigError, match=r"beanstalkd\.servers.*listed twice"):
        load_settings(path)
    path.write_text('[beanstalkd]\nservers = ["a:1", "[::1]:11301"]\n')
    assert load_settings(path).beanstalkd.addresses() == [("a", 1), ("::1", 11301)]


def test_host_and_port_are_the_one_server_shorthand(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[beanstalkd]\nhost = "10.1.1.1"\nport = 11400\n')
    assert load_settings(path).beanstalkd.addresses() == [("10.1.1.1", 11400)]


def test_the_first_servers_ids_are_stored_unchanged_and_others_carry_their_server() -> None:
    assert fleet_job_id(0, 884836) == 884836
    assert split_job_id(884836) == (0, 884836)  # ids stored before there were several servers
    assert split_job_id(fleet_job_id(3, 17)) == (3, 17)
    assert fleet_job_id(1, 17) > 1 << SERVER_SHIFT
    # Round robin by job id stays exact per server: consecutive ids of a server cycle through
    # every vendor in turn.
    first = fleet_job_id(1, 100)
    assert [fleet_job_id(1, k) % 4 for k in range(100, 108)] == [(first + i) % 4 for i in range(8)]
    assert len({fleet_job_id(1, k) % 4 for k in range(100, 104)}) == 4


def test_a_mails_server_is_stable_and_consecutive_ids_alternate() -> None:
    ids = [str(ObjectId()) for _ in range(1000)]
    assert [server_of(i, 2) for i in ids] == [server_of(i, 2) for i in ids]
    share = collections.Counter(server_of(i, 2) for i in ids)
    assert 450 <= share[0] <= 550, share
    assert server_of("not-hex-at-the-end", 3) in (0, 1, 2)
    assert server_of(ids[0], 1) == 0


# --- the producer over two servers ----------------------------------------------------


async def test_mails_spread_over_both_servers_and_a_retried_put_goes_to_the_same(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd]
) -> None:
    settings = on_pair(await make_settings(), pair)
    tube = settings.beanstalkd.tube
    async with Producer(settings) as producer:
        ids = await producer.send_many([mail(i) for i in range(2000)])
        for _ in range(20):  # a lone send each
            ids.append(await producer.send(mail(0)))
        again = [split_job_id(await producer.queue.put(ids[0]))[0] for _ in range(3)]
    counts = [await jobs_on(s.port, tube) for s in pair]
    assert sum(counts) == len(ids) + 3
    assert all(0.4 * len(ids) <= c <= 0.6 * len(ids) for c in counts), counts
    assert again == [server_of(ids[0], 2)] * 3


async def test_a_put_whose_server_is_down_goes_to_the_next_and_none_left_raises(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd]
) -> None:
    settings = on_pair(await make_settings(), pair)
    tube = settings.beanstalkd.tube
    async with Producer(settings) as producer:
        pair[1].kill()
        ids = [await producer.send(mail(i)) for i in range(10)]
        ids += await producer.send_many([mail(i) for i in range(10, 30)])
        assert await jobs_on(pair[0].port, tube) == 30
        pair[0].kill()
        with pytest.raises(EnqueueError) as info:
            await producer.send(mail(99))
        assert "beanstalkd" in str(info.value)
    async with MailStore(settings) as store:
        found = await docs(store, ids, {"batch": 1, "job_id": 1})
    assert len(found) == 30


async def test_the_failed_server_is_tried_last_for_a_while() -> None:
    clock = FakeClock(0.0)
    fleet = Fleet([Beanstalk("127.0.0.1", 1), Beanstalk("127.0.0.1", 2)], clock=clock)
    assert fleet.order(0) == [0, 1]
    fleet._failed(0, NotFound("x"))
    assert fleet.order(0) == [1, 0]
    clock.advance(10)
    assert fleet.order(0) == [0, 1]


# --- receipts, the sweep and the consumer over two servers ---------------------------


async def test_receipts_name_each_jobs_server_and_the_sweep_asks_that_server(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd]
) -> None:
    settings = on_pair(await make_settings(), pair)
    async with Producer(settings) as producer:
        ids = await producer.send_many([mail(i) for i in range(40)])
    async with MailStore(settings) as store, Fleet.from_settings(settings.beanstalkd) as fleet:
        batches = {str(d["batch"]) for d in (await docs(store, ids, {"batch": 1})).values()}
        receipts = await store.receipts(batches)
        recorded = {m: j for r in receipts.values() if r for m, j in r.items()}
        assert {split_job_id(recorded[i])[0] for i in ids} == {0, 1}
        assert all(split_job_id(recorded[i])[0] == server_of(i, 2) for i in ids)
        report = await sweep(settings, store, fleet, older_than_s=0, now=time.time() + 3600)
    assert report.live == 40 and report.requeued == [], report.summary()


async def test_the_sweep_puts_a_lost_servers_mails_on_the_survivor_and_each_is_sent_once(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd]
) -> None:
    settings = on_pair(await make_settings(), pair)
    tube = settings.beanstalkd.tube
    async with Producer(settings) as producer:
        ids = await producer.send_many([mail(i) for i in range(60)])
    on_lost = [i for i in ids if server_of(i, 2) == 1]
    pair[1].kill()  # gone for good, with its jobs
    async with MailStore(settings) as store, Fleet.from_settings(settings.beanstalkd) as fleet:
        report = await sweep(settings, store, fleet, older_than_s=0, now=time.time() + 3600)
        assert sorted(report.requeued) == sorted(on_lost), report.summary()
        assert report.live == len(ids) - len(on_lost)
        assert await jobs_on(pair[0].port, tube) == len(ids)
        vendors = fake_vendors()
        async with running_consumer(settings, vendors, concurrency=4):
            await wait_all_status(store, ids, "sent")
    sends = collections.Counter(m for v in vendors for m in v.delivered)
    assert set(sends) == set(ids) and set(sends.values()) == {1}


async def test_a_job_of_the_second_server_is_kept_by_its_fleet_id_and_settled_there(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd]
) -> None:
    settings = on_pair(await make_settings(), pair)
    tube = settings.beanstalkd.tube
    consumer = Consumer(settings, concurrency=1, vendors=fake_vendors())
    async with consumer, Beanstalk("127.0.0.1", pair[1].port) as queue:
        await queue.use(tube)
        local = await queue.put(b"0123456789abcdef01234567")
        await queue.watch(tube)
        job = await queue.reserve(2)
        owned = OwnedJob(job, queue, consumer.delivery, server=1)
        assert owned.id == fleet_job_id(1, local) and owned.local_id == local
        await owned.touch()  # on its own server, by that server's id
        assert (await queue.stats_job(local))["state"] == "reserved"


async def test_one_loop_per_server_at_least_so_every_server_is_reserved_from(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd]
) -> None:
    settings = with_consumer(on_pair(await make_settings(), pair), reserve_timeout_s=0)
    async with Producer(settings) as producer:
        ids = await producer.send_many([mail(i) for i in range(20)])
    vendors = fake_vendors()
    async with MailStore(settings) as store, running_consumer(settings, vendors, concurrency=1):
        await wait_all_status(store, ids, "sent", within=20)


@pytest.mark.slow
async def test_2000_mails_over_two_servers_are_each_delivered_once(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd]
) -> None:
    settings = on_pair(await make_settings(), pair)
    async with Producer(settings) as producer:
        ids = await producer.send_many([mail(i) for i in range(2000)])
    counts = [await jobs_on(s.port, settings.beanstalkd.tube) for s in pair]
    assert all(800 <= c <= 1200 for c in counts), counts
    vendors = fake_vendors()
    async with MailStore(settings) as store, running_consumer(settings, vendors, concurrency=20):
        found = await wait_all_status(store, ids, "sent", within=90)
    sends = collections.Counter(m for v in vendors for m in v.delivered)
    assert len(sends) == 2000 and set(sends.values()) == {1}
    servers = collections.Counter(split_job_id(d["job_id"])[0] for d in found.values())
    assert servers == {0: counts[0], 1: counts[1]}


# --- MongoDB write concern ------------------------------------------------------------


async def test_the_write_concern_reaches_every_collection(make_settings: MakeSettings) -> None:
    settings = await make_settings()
    m = settings.mongodb
    majority = settings.model_copy(
        update={"mongodb": m.model_copy(update={"write_concern": "majority", "journal": True})}
    )
    async with MailStore(majority) as store:
        for coll in (store.mails, store.vendor_status, store.consumers):
            assert coll.write_concern == WriteConcern(w="majority", j=True)
        assert store.mails.read_preference.mongos_mode == "primary"
    two = settings.model_copy(update={"mongodb": m.model_copy(update={"write_concern": 2})})
    async with MailStore(two) as store:
        assert store.mails.write_concern == WriteConcern(w=2)


async def test_the_default_write_concern_is_1_on_a_standalone(make_settings: MakeSettings) -> None:
    settings = await make_settings()
    assert settings.mongodb.write_concern is None  # decided at connect, from the server
    async with MailStore(settings) as store:
        assert store.mails.write_concern == WriteConcern(w=1)
        assert store.write_concern_for({"setName": "rs0"}) == WriteConcern(w="majority")
        assert store.write_concern_for({"isWritablePrimary": True}) == WriteConcern(w=1)


async def test_the_default_write_concern_is_majority_through_a_mongos(make_settings: MakeSettings) -> None:
    """A mongos's reply names no set, yet its shards are replica sets."""
    async with MailStore(await make_settings()) as store:
        mongos = {"isWritablePrimary": True, "msg": "isdbgrid"}
        assert store.write_concern_for(mongos) == WriteConcern(w="majority")


def test_a_bad_write_concern_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[mongodb]\nwrite_concern = "most"\n')
    with pytest.raises(ConfigError, match=r"mongodb\.write_concern"):
        load_settings(path)
    path.write_text("[mongodb]\nwrite_concern = 0\n")
    with pytest.raises(ConfigError, match=r"mongodb\.write_concern"):
        load_settings(path)


async def test_a_w_in_the_uri_is_kept_when_the_setting_is_unset(make_settings: MakeSettings) -> None:
    settings = await make_settings()
    m = settings.mongodb
    uri = m.uri.get_secret_value()
    with_w = uri + ("&" if "?" in uri else "?") + "w=majority"
    majority = settings.model_copy(update={"mongodb": m.model_copy(update={"uri": SecretStr(with_w)})})
    async with MailStore(majority) as store:
        assert store.mails.write_concern == WriteConcern(w="majority")


async def test_stats_and_kick_cover_every_server(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = on_pair(await make_settings(), pair)
    tube = settings.beanstalkd.tube
    for n, server in enumerate(pair, start=2):
        async with Beanstalk("127.0.0.1", server.port) as bs:
            await bs.use(tube)
            for _ in range(n):
                await bs.put(b"x", delay=3600)
    assert await cli.cmd_stats(settings, argparse.Namespace(json=True)) == 0
    assert json.loads(capsys.readouterr().out)["jobs"]["delayed"] == 5
    assert await cli.cmd_kick(settings, argparse.Namespace(json=True, bound=10)) == 0
    assert json.loads(capsys.readouterr().out)["kicked"] == 5
    pair[1].kill()
    assert await cli.cmd_stats(settings, argparse.Namespace(json=True)) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["jobs"]["ready"] == 2 and shown["unreachable"] == [f"127.0.0.1:{pair[1].port}"]


async def test_a_server_that_comes_back_takes_its_own_mails_again(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd]
) -> None:
    settings = on_pair(await make_settings(), pair)
    async with Producer(settings) as producer:
        mine = next(str(i) for i in (ObjectId() for _ in range(100)) if server_of(str(i), 2) == 0)
        assert split_job_id(await producer.queue.put(mine))[0] == 0
        pair[0].kill()
        pair[0].start()  # the same port and binlog: the producer's connection to it is dead
        assert split_job_id(await producer.queue.put(mine))[0] == 0
    async with Beanstalk("127.0.0.1", pair[0].port) as bs:  # the first job came back from the binlog
        assert (await bs.stats_tube(settings.beanstalkd.tube))["current-jobs-ready"] == 2


async def test_check_and_ready_cover_every_server(
    make_settings: MakeSettings, pair: list[OwnBeanstalkd]
) -> None:
    """``mailer check`` has a line per server and fails one that is down; ``/v1/ready`` stays
    ready while any server answers (the producer fails over), and not once none does."""
    from mailer.service.routes import _beanstalkd_stats

    settings = on_pair(await make_settings(), pair)
    assert [c.state for c in await cli._check_beanstalkd(settings)] == ["ok", "ok"]
    await _beanstalkd_stats(settings)
    pair[1].kill()
    checks = await cli._check_beanstalkd(settings)
    assert [c.state for c in checks] == ["ok", "FAIL"]
    assert f":{pair[1].port} does not answer" in checks[1].detail
    await _beanstalkd_stats(settings)  # still ready: one answers
    pair[0].kill()
    with pytest.raises(ConnectionError, match=f":{pair[0].port}.*:{pair[1].port}"):
        await _beanstalkd_stats(settings)
