"""The durable retry schedule in the real Redis, relayed through a real Celery broker."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.test import override_settings

from tests.broker import PROBE_TASK as PROBE
from tests.broker import probe_app, queued
from toot import retries
from toot.store import get_redis


@pytest.fixture
def probe(redis):
    """A Celery app on the real broker with a queue of the test's own.

    No worker consumes that queue and no other relay claims its retries: the test reads
    what was sent from the queue itself.
    """
    with probe_app(f"{settings.TOOT['KEY_PREFIX']}probe-{uuid.uuid4().hex[:8]}") as app:
        yield app
        other = f"{queue_of(app)}-other"
        redis.delete(f"_kombu.binding.{other}", f"_kombu.binding_permanent.{other}")


def queue_of(app):
    return app.conf.task_default_queue


def sent(app, queue=None):
    return queued(queue or queue_of(app))


def keys(queue):
    due, claimed, data = retries._keys(queue)
    return SimpleNamespace(due=due, claimed=claimed, data=data)


def claim(queue):
    """What a relay does first: move the due entries to the claimed set (then it may die)."""
    k = keys(queue)
    return get_redis().eval(retries.CLAIM_SCRIPT, 3, k.due, k.claimed, k.data, time.time(), 100)


def test_schedule_writes_an_entry_due_after_the_delay(redis):
    queue = "some-queue"
    before = time.time()
    retry_id = retries.schedule(
        "toot.deliver", [{"id": "e1"}, "http://peer/"], {"attempts": 2}, 30.0, queue
    )
    after = time.time()

    assert retries.pending(queue) == 1
    assert before + 30.0 <= redis.zscore(keys(queue).due, retry_id) <= after + 30.0
    assert json.loads(redis.hget(keys(queue).data, retry_id)) == {
        "task": "toot.deliver",
        "args": [{"id": "e1"}, "http://peer/"],
        "kwargs": {"attempts": 2},
    }
    retries.schedule("toot.deliver", [], {}, 0.0, queue)
    assert retries.pending(queue) == 2
    assert retries.pending("another-queue") == 0


def test_relay_due_sends_due_entries_and_keeps_future_ones(probe, redis):
    queue = queue_of(probe)
    retries.schedule(PROBE, ["now"], {"attempts": 1}, 0.0, queue)
    later = retries.schedule(PROBE, ["later"], {}, 3600.0, queue)

    assert retries.relay_due(probe, [queue]) == 1

    assert sent(probe) == [(PROBE, ["now"], {"attempts": 1})]
    assert retries.pending(queue) == 1
    assert redis.zrange(keys(queue).due, 0, -1) == [later.encode()]
    assert redis.hkeys(keys(queue).data) == [later.encode()]  # a sent entry leaves no data behind
    assert retries.relay_due(probe, [queue]) == 0
    assert len(sent(probe)) == 1


def test_each_queue_relays_only_its_own_retries_back_to_that_queue(probe):
    queue, other = queue_of(probe), f"{queue_of(probe)}-other"
    retries.schedule(PROBE, ["mine"], {}, 0.0, queue)
    retries.schedule(PROBE, ["theirs"], {}, 0.0, other)

    assert retries.relay_due(probe, [queue]) == 1
    assert sent(probe) == [(PROBE, ["mine"], {})]
    assert sent(probe, other) == []
    assert retries.pending(other) == 1

    assert retries.relay_due(probe, [queue, other]) == 1
    assert sent(probe, other) == [(PROBE, ["theirs"], {})]  # not the app's default queue
    assert len(sent(probe)) == 1


def test_racing_relays_send_each_due_entry_exactly_once(probe):
    queue, count, relays = queue_of(probe), 400, 8
    for n in range(count):
        retries.schedule(PROBE, [n], {}, 0.0, queue)
    start = threading.Barrier(relays)

    def relay_until_none_due():
        start.wait()
        total = 0
        while batch := retries.relay_due(probe, [queue], limit=7):  # small batches: more races
            total += batch
        return total

    with ThreadPoolExecutor(relays) as pool:
        futures = [pool.submit(relay_until_none_due) for _ in range(relays)]
        totals = [future.result(timeout=60) for future in futures]

    numbers = [args[0] for _, args, _ in sent(probe)]
    assert len(numbers) == count
    assert sorted(numbers) == list(range(count))
    assert sum(totals) == count
    assert sum(1 for total in totals if total) > 1  # the relays really did share the work
    assert retries.pending(queue) == 0


def test_an_entry_claimed_by_a_dead_relay_is_sent_after_the_claim_timeout(probe, monkeypatch):
    queue = queue_of(probe)
    retry_id = retries.schedule(PROBE, ["orphaned"], {}, 0.0, queue)
    [claimed_id, _] = claim(queue)  # the relay that claimed it died before sending
    assert claimed_id == retry_id.encode()
    assert retries.pending(queue) == 1

    assert retries.relay_due(probe, [queue]) == 0  # a fresh claim: its relay may still send it
    now = time.time()
    monkeypatch.setattr(
        retries, "time", SimpleNamespace(time=lambda: now + retries.CLAIM_TIMEOUT - 5)
    )
    assert retries.relay_due(probe, [queue]) == 0
    assert sent(probe) == []

    monkeypatch.setattr(
        retries, "time", SimpleNamespace(time=lambda: now + retries.CLAIM_TIMEOUT + 5)
    )
    assert retries.relay_due(probe, [queue]) == 1
    assert sent(probe) == [(PROBE, ["orphaned"], {})]
    assert retries.pending(queue) == 0
    assert retries.relay_due(probe, [queue]) == 0
    assert len(sent(probe)) == 1


def test_an_entry_without_data_is_dropped(probe, redis):
    queue = queue_of(probe)
    redis.zadd(keys(queue).due, {"lost-its-data": time.time()})
    retries.schedule(PROBE, ["intact"], {}, 0.0, queue)

    assert retries.relay_due(probe, [queue]) == 1

    assert sent(probe) == [(PROBE, ["intact"], {})]
    assert retries.pending(queue) == 0
    assert not redis.exists(keys(queue).data)


def test_retries_are_namespaced_by_key_prefix(probe, redis):
    queue, prefix = queue_of(probe), settings.TOOT["KEY_PREFIX"]
    other = f"{prefix}other:"  # still under the run's prefix, which `redis` cleans
    retries.schedule(PROBE, ["mine"], {}, 0.0, queue)

    with override_settings(TOOT={**settings.TOOT, "KEY_PREFIX": other}):
        assert retries.pending(queue) == 0
        assert retries.relay_due(probe, [queue]) == 0
        retries.schedule(PROBE, ["theirs"], {}, 0.0, queue)
        assert retries.pending(queue) == 1

    assert redis.zcard(f"{prefix}retries:{queue}:due") == 1
    assert redis.zcard(f"{other}retries:{queue}:due") == 1
    assert retries.relay_due(probe, [queue]) == 1
    assert sent(probe) == [(PROBE, ["mine"], {})]
    assert retries.pending(queue) == 0
    assert redis.zcard(f"{other}retries:{queue}:due") == 1


@pytest.mark.parametrize(
    "raw", ["{not json", json.dumps({"task": "not.a.toot.task", "args": [], "kwargs": {}})]
)
def test_an_entry_that_cannot_be_sent_stays_claimed_and_the_rest_go(probe, redis, raw, caplog):
    queue = queue_of(probe)
    k = keys(queue)
    redis.hset(k.data, "poison", raw)
    redis.zadd(k.due, {"poison": time.time() - 1})
    retries.schedule(PROBE, ["intact"], {}, 0.0, queue)

    assert retries.relay_due(probe, [queue]) == 1

    assert sent(probe) == [(PROBE, ["intact"], {})]
    assert redis.zscore(k.claimed, "poison") is not None  # found again after CLAIM_TIMEOUT
    assert "Retry poison" in caplog.text
