"""The work queues in the real Redis: pushes, claims, leases, retries and recovery."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis as redis_py
from django.conf import settings
from django.test import override_settings
from redis.crc import key_slot

from tests.utils import expire, live_leases, redis_now, toot_settings
from toot.conf import conf
from toot.engine import connection, queue
from toot.exceptions import LeaseLost


@pytest.fixture
def name(redis):
    """A queue of the test's own: no relay wakes it and no drain takes from it."""
    return f"test-{uuid.uuid4().hex[:8]}"


def max_drains(count):
    return toot_settings(MAX_DRAINS=count)


def leased(name: str, pushed: list[dict[str, Any]]) -> str:
    """Push as publish() does, while a lease is free: the drain id the push returns."""
    drain_id = queue.push(name, pushed)
    assert drain_id is not None
    return drain_id


def holding(redis, name: str, drain_id: str = "drain") -> str:
    """A live lease for ``drain_id``, as a push that starts its drain takes one."""
    redis.zadd(queue._keys(name)[2], {drain_id: redis_now(redis) + conf.LEASE_SECONDS})
    return drain_id


def items(*labels: Any) -> list[dict[str, Any]]:
    return [{"n": label} for label in labels]


def decoded(raw: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(item) for item in raw]


def ready(redis, name):
    return decoded(redis.lrange(queue._keys(name)[0], 0, -1))


def delayed(redis, name):
    """The retries waiting, with the seconds until each is due (by Redis' clock)."""
    now = redis_now(redis)
    entries = redis.zrange(queue._keys(name)[1], 0, -1, withscores=True)
    return [(json.loads(item), due - now) for item, due in entries]


def claimed(redis, name, drain_id):
    return decoded(redis.lrange(queue.claimed_key(name, drain_id), 0, -1))


def schedule(redis, name, item, seconds):
    """A retry due in ``seconds`` (by Redis' clock), as a drain's claim writes it."""
    redis.zadd(queue._keys(name)[1], {queue.encode(item): redis_now(redis) + seconds})


def blocked_in_blmove(redis, client_name: str) -> bool:
    return any(
        client["name"] == client_name and client["cmd"] == "blmove" and "b" in client["flags"]
        for client in redis.client_list()
    )


# push


def test_push_appends_in_order_and_claim_takes_the_oldest_first(redis, name):
    holding(redis, name)
    queue.push(name, items(1, 2))
    queue.push(name, items(3))

    assert queue.claim(name, "drain", 10) == items(1, 2, 3)


def encoded(*labels: Any) -> list[str]:
    return [queue.encode(item) for item in items(*labels)]


def test_push_many_pushes_onto_each_lane_and_lists_the_lanes_for_the_relay(redis, name):
    first, second = f"{name}:first", f"{name}:second"
    holding(redis, second)  # a drain runs there: the push starts none

    drains = queue.push_many({first: encoded(1, 2), second: encoded(3)})

    assert drains[first] is not None
    assert drains[second] is None
    assert (ready(redis, first), ready(redis, second)) == (items(1, 2), items(3))
    assert {first, second} <= set(queue.lanes())
    assert queue.kind(first) == queue.kind(name) == name


def test_other_lanes_waiting_sees_a_new_lane_once_its_reading_of_the_lanes_is_old(
    redis, name, monkeypatch
):
    first, second = f"{name}:first", f"{name}:second"
    holding(redis, first)
    queue.push_many({first: encoded(1)})
    assert not queue.other_lanes_waiting(first)  # the lanes read: only its own
    queue.push_many({second: encoded(2)})
    assert not queue.other_lanes_waiting(first)  # a drain of its own serves it meanwhile
    monkeypatch.setattr(queue, "KNOWN_LANES_SECONDS", 0.0)
    assert queue.other_lanes_waiting(first)
    assert not queue.other_lanes_waiting(name)  # a queue without lanes


def test_push_many_loads_its_script_where_redis_forgot_it(redis, name):
    redis.script_flush()  # a restarted Redis

    assert queue.push_many({f"{name}:lane": encoded(1)})[f"{name}:lane"] is not None
    assert ready(redis, f"{name}:lane") == items(1)


def test_commands_before_scripts_run_once_though_redis_forgot_the_scripts(redis, name):
    """The scripts that met NoScriptError run again, not what came before them: a handler
    run ends with its minute counted once."""
    key = f"{name}:counter"
    redis.script_flush()  # a restarted Redis

    [result] = connection.run_scripts(
        [(queue.RETRY_NOW_SCRIPT, [queue._keys(name)[1]], [1])],
        before=lambda pipe: pipe.incr(key),
    )

    assert (result, redis.get(key)) == (0, b"1")
    redis.delete(key)


def test_push_many_raises_what_redis_refused_once_the_other_lanes_are_pushed(redis, name):
    """A pipeline, not a transaction: the caller's retry pushes again, and the handlers'
    done marks keep the lanes pushed twice from running twice."""
    broken, fine = f"{name}:broken", f"{name}:fine"
    redis.set(queue._keys(broken)[0], "not a list")

    with pytest.raises(redis_py.ResponseError, match="WRONGTYPE"):
        queue.push_many({broken: encoded(1), fine: encoded(2)})
    assert ready(redis, fine) == items(2)


def test_push_starts_a_drain_when_none_runs_and_more_as_the_backlog_grows(redis, name):
    backlog = queue.BACKLOG_PER_DRAIN
    with max_drains(2):
        first = queue.push(name, items(0))
        assert first is not None  # none ran
        # A trickle stays with the running drain: no new drain (and no Celery message) each.
        assert queue.push(name, items(*range(1, backlog))) is None  # backlog items wait
        second = queue.push(name, items(backlog))  # one more than one drain keeps up with
        assert second not in (None, first)
        assert queue.push(name, items(*range(100, 200))) is None  # MAX_DRAINS run
        assert live_leases(redis, name) == sorted([first, second])

        expire(redis, name, first)  # its drain died: the lease no longer counts
        third = queue.push(name, items("x"))
        assert third not in (None, first, second)

        queue.forget(name, second)
        assert queue.push(name, items("y")) not in (None, first, second, third)

    assert queue.pending(name) == backlog + 1 + 100 + 2  # every item queued either way


def test_racing_pushers_start_at_most_max_drains(redis, name):
    pushers = 16
    start = threading.Barrier(pushers)

    def push(n):
        start.wait()
        # Each push a backlog for one more drain.
        return queue.push(name, items(*(n * 100 + i for i in range(queue.BACKLOG_PER_DRAIN))))

    with max_drains(3), ThreadPoolExecutor(pushers) as pool:
        drain_ids = list(pool.map(push, range(pushers), timeout=60))

    started = [drain_id for drain_id in drain_ids if drain_id is not None]
    assert len(started) == len(set(started)) == 3
    assert live_leases(redis, name) == sorted(started)
    claimed_items = queue.claim(name, started[0], 10_000)
    assert len(claimed_items) == pushers * queue.BACKLOG_PER_DRAIN


def test_a_push_that_cannot_be_encoded_queues_nothing_and_takes_no_lease(redis, name):
    with pytest.raises(TypeError):
        queue.push(name, [{"n": 1}, {"n": object()}])

    assert queue.pending(name) == 0
    assert live_leases(redis, name) == []


def test_a_claim_never_sees_part_of_a_push(redis, name):
    holding(redis, name)
    pushes, size = 200, 20

    def pusher():
        for n in range(pushes):
            queue.push(name, [{"n": n, "i": i} for i in range(size)])

    thread = threading.Thread(target=pusher)
    thread.start()
    taken: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while len(taken) < pushes * size and time.monotonic() < deadline:
        batch = queue.claim(name, "drain", 1_000_000)
        assert len(batch) % size == 0  # whole pushes, never a part of one
        taken += batch
    thread.join(10)

    assert taken == [{"n": n, "i": i} for n in range(pushes) for i in range(size)]


# claim


def test_claim_takes_at_most_limit_and_drops_the_last_batch(redis, name):
    holding(redis, name)
    queue.push(name, items(1, 2, 3, 4, 5))

    assert queue.claim(name, "drain", 2) == items(1, 2)
    assert claimed(redis, name, "drain") == items(1, 2)

    assert queue.claim(name, "drain", 2) == items(3, 4)
    assert claimed(redis, name, "drain") == items(3, 4)  # 1 and 2 are done
    assert queue.pending(name) == 3

    assert queue.claim(name, "drain", 2) == items(5)
    assert queue.claim(name, "drain", 2) == []
    assert queue.pending(name) == 0
    assert not redis.exists(queue.claimed_key(name, "drain"))


def test_a_runs_first_claim_takes_over_what_a_dead_run_of_its_id_held(redis, name):
    """A message run twice (acks_late, a redelivery) must not drop the first run's batch."""
    holding(redis, name)
    queue.push(name, items(1, 2, 3))
    assert queue.claim(name, "drain", 2) == items(1, 2)  # the first run, then it died

    assert queue.claim(name, "drain", 2, first=True) == items(1, 2)  # in order, first

    assert ready(redis, name) == items(3)
    assert queue.claim(name, "drain", 2) == items(3)  # later claims end their batch
    assert queue.pending(name) == 1


def test_a_claim_of_zero_takes_nothing_and_ends_the_batch(redis, name):
    holding(redis, name)
    queue.push(name, items(1, 2))
    assert queue.claim(name, "drain", 1) == items(1)

    assert queue.claim(name, "drain", 0, [({"n": 1, "attempts": 1}, 3600.0)]) == []

    assert claimed(redis, name, "drain") == []
    assert ready(redis, name) == items(2)
    assert [item for item, _ in delayed(redis, name)] == [{"n": 1, "attempts": 1}]
    assert queue.pending(name) == 2


def test_claim_schedules_the_last_batchs_retries_as_it_drops_the_batch(redis, name):
    holding(redis, name)
    queue.push(name, items(1, 2, 3))
    assert queue.claim(name, "drain", 3) == items(1, 2, 3)
    retries = [({"n": 1, "attempts": 1}, 30.0), ({"n": 2, "attempts": 1}, 3600.0)]

    assert queue.claim(name, "drain", 10, retries) == []

    # In one step: item 3 is done, 1 and 2 wait for their retries, nothing is held twice.
    assert claimed(redis, name, "drain") == []
    assert queue.pending(name) == 2
    [(first, in_first), (second, in_second)] = delayed(redis, name)
    assert (first, second) == ({"n": 1, "attempts": 1}, {"n": 2, "attempts": 1})
    assert 29.0 < in_first <= 30.0
    assert 3599.0 < in_second <= 3600.0


def test_a_retry_due_at_once_is_claimed_behind_what_was_ready(redis, name):
    holding(redis, name)
    queue.push(name, items(1))
    assert queue.claim(name, "drain", 1) == items(1)
    queue.push(name, items(2))

    assert queue.claim(name, "drain", 10, [({"n": 1, "attempts": 1}, 0.0)]) == [
        {"n": 2},
        {"n": 1, "attempts": 1},
    ]


def test_due_retries_become_ready_and_later_ones_wait(redis, name):
    holding(redis, name)
    schedule(redis, name, {"n": "due"}, -1)
    schedule(redis, name, {"n": "later"}, 3600)

    assert queue.claim(name, "drain", 10) == [{"n": "due"}]

    assert [item for item, _ in delayed(redis, name)] == [{"n": "later"}]
    assert queue.pending(name) == 2  # the one claimed, the one waiting
    assert queue.claim(name, "drain", 10) == []
    assert queue.pending(name) == 1


def test_a_claim_renews_the_drains_lease(redis, name):
    drain_id = leased(name, items(1, 2))
    assert queue.claim(name, drain_id, 1) == items(1)
    expire(redis, name, drain_id)

    before = redis_now(redis)
    assert queue.claim(name, drain_id, 1) == items(2)

    lease_end = redis.zscore(queue._keys(name)[2], drain_id)
    assert before + conf.LEASE_SECONDS <= lease_end <= redis_now(redis) + conf.LEASE_SECONDS
    assert queue.wake(name) is None  # a live drain: what it holds stays with it
    assert claimed(redis, name, drain_id) == items(2)


def test_racing_drains_claim_each_item_exactly_once(redis, name):
    count, drains = 400, 8
    queue.push(name, items(*range(count)))
    start = threading.Barrier(drains)

    def drain(drain_id):
        start.wait()
        taken = []
        while batch := queue.claim(name, drain_id, 7):  # small batches: more races
            taken += batch
        return taken

    drain_ids = [holding(redis, name, f"drain-{n}") for n in range(drains)]
    with ThreadPoolExecutor(drains) as pool:
        results = list(pool.map(drain, drain_ids, timeout=60))

    assert sorted(item["n"] for taken in results for item in taken) == list(range(count))
    assert sum(1 for taken in results if taken) > 1  # the drains really did share the work
    assert queue.pending(name) == 0


# wait


def test_wait_returns_an_item_pushed_while_it_blocks(redis, name, eventually, monkeypatch):
    drain_id = leased(name, [])  # the lease the drain holds
    # The waiting thread's own client, named: the test worker's drains block in BLMOVE too.
    waiting = redis_py.Redis.from_url(conf.REDIS_URL, client_name=f"wait-{name}")
    mine = threading.get_ident
    waiter_id: list[int] = []
    monkeypatch.setattr(
        queue, "get_redis", lambda: waiting if waiter_id == [mine()] else connection.get_redis()
    )
    got: list[Any] = []

    def wait() -> None:
        waiter_id.append(mine())
        got.append(queue.wait(name, drain_id, 20))

    waiter = threading.Thread(target=wait)
    started = time.monotonic()
    waiter.start()
    eventually(lambda: blocked_in_blmove(redis, f"wait-{name}"), what="wait to block")

    queue.push(name, items(1))

    waiter.join(20)
    assert got == items(1)
    assert time.monotonic() - started < 10  # at once, not at the timeout
    # Claimed for the drain: held by it (counted, out of ready) until its next claim.
    assert claimed(redis, name, drain_id) == items(1)
    assert ready(redis, name) == []
    assert queue.pending(name) == 1
    assert queue.claim(name, drain_id, 10) == []
    assert queue.pending(name) == 0
    waiting.close()


def test_wait_returns_none_after_the_timeout(redis, name):
    started = time.monotonic()
    assert queue.wait(name, "drain", 0.2) is None
    assert 0.15 <= time.monotonic() - started < 5
    assert queue.pending(name) == 0


# release, renew, forget


def test_release_ends_the_lease_when_no_work_waits(redis, name):
    with max_drains(1):
        drain_id = leased(name, items(1))
        assert queue.claim(name, drain_id, 10) == items(1)
        assert queue.claim(name, drain_id, 10) == []

        assert queue.release(name, drain_id) is True

        assert live_leases(redis, name) == []
        assert queue.push(name, items(2)) is not None  # the next push starts a drain again


def test_release_keeps_the_lease_when_work_came_in_as_it_was_ending(redis, name):
    # The race the module guards against: an item pushed while the only drain's lease is
    # live starts no drain, so that drain must not end as if the queue were empty.
    with max_drains(1):
        drain_id = leased(name, items(1))
        assert queue.claim(name, drain_id, 10) == items(1)
        assert queue.claim(name, drain_id, 10) == []
        assert queue.push(name, items(2)) is None  # "a drain runs": none is started

        assert queue.release(name, drain_id) is False

        assert live_leases(redis, name) == [drain_id]
        assert queue.claim(name, drain_id, 10) == items(2)
        assert queue.claim(name, drain_id, 10) == []
        assert queue.release(name, drain_id) is True
        assert live_leases(redis, name) == []


@pytest.mark.parametrize(("due_in", "released"), [(-1, False), (3600, True)])
def test_release_keeps_the_lease_for_a_due_retry_only(redis, name, due_in, released):
    drain_id = leased(name, [])
    schedule(redis, name, {"n": "retry"}, due_in)

    assert queue.release(name, drain_id) is released

    assert live_leases(redis, name) == ([] if released else [drain_id])


def test_a_drain_whose_lease_went_to_another_can_neither_claim_nor_renew(redis, name):
    drain_id = leased(name, items(1, 2))
    assert queue.claim(name, drain_id, 1) == items(1)
    expire(redis, name, drain_id)
    assert queue.wake(name) not in (None, drain_id)  # the relay gave item 1 to another drain

    with pytest.raises(LeaseLost):
        queue.claim(name, drain_id, 10, [({"n": 1, "attempts": 1}, 30.0)])
    with pytest.raises(LeaseLost):
        queue.renew(name, drain_id)

    assert delayed(redis, name) == []  # item 1's retry is the other drain's to schedule
    assert ready(redis, name) == items(1, 2)
    assert drain_id not in live_leases(redis, name)


def test_a_batch_taken_after_the_lease_went_is_ended_by_the_drain_that_took_it(redis, name):
    drain_id = leased(name, items(1, 2))
    queue.forget(name, drain_id)  # gone, by whatever means
    assert queue.wait(name, drain_id, 1) == {"n": 1}  # as the drain lingered

    with pytest.raises(LeaseLost):
        queue.claim(name, drain_id, 10, [({"n": 1, "attempts": 1}, 30.0)])

    assert [item for item, _ in delayed(redis, name)] == [{"n": 1, "attempts": 1}]
    assert ready(redis, name) == items(2)  # nothing more claimed
    assert claimed(redis, name, drain_id) == []


def test_renew_extends_a_lease(redis, name):
    drain_id = leased(name, items(1))
    assert queue.claim(name, drain_id, 1) == items(1)
    expire(redis, name, drain_id)
    before = redis_now(redis)

    queue.renew(name, drain_id)

    lease_end = redis.zscore(queue._keys(name)[2], drain_id)
    # Redis TIME in whole seconds: the lease may end up to a second early, never late.
    assert before + conf.LEASE_SECONDS - 1 <= lease_end <= redis_now(redis) + conf.LEASE_SECONDS
    assert queue.wake(name) is None
    assert claimed(redis, name, drain_id) == items(1)


def test_forget_gives_up_a_lease_and_keeps_the_items(redis, name):
    with max_drains(1):
        drain_id = leased(name, items(1))
        assert queue.push(name, items(2)) is None

        queue.forget(name, drain_id)

        assert live_leases(redis, name) == []
        another = queue.push(name, items(3))
        assert another not in (None, drain_id)
    assert queue.claim(name, another, 10) == items(1, 2, 3)


# wake: what the relay does every RELAY_INTERVAL


def test_wake_gives_an_expired_leases_items_back_first_in_order(redis, name):
    drain_id = leased(name, items(1, 2, 3, 4))
    assert queue.claim(name, drain_id, 3) == items(1, 2, 3)  # and then the drain died

    expire(redis, name, drain_id)
    queue.wake(name)

    assert ready(redis, name) == items(1, 2, 3, 4)


def test_wake_gives_an_expired_leases_items_back_and_starts_a_drain(redis, name):
    dead = leased(name, items(1, 2, 3, 4))
    assert queue.claim(name, dead, 3) == items(1, 2, 3)  # and then the drain died
    expire(redis, name, dead)
    live = leased(name, items(5))  # no live drain, so this push starts one
    assert queue.claim(name, live, 1) == items(4)

    # The live drain takes what its dead peer held: no other starts for so few.
    assert queue.wake(name) is None
    assert sorted(item["n"] for item in ready(redis, name)) == [1, 2, 3, 5]
    assert claimed(redis, name, live) == items(4)  # a live drain keeps what it holds

    expire(redis, name, live)  # and now it died too
    drain_id = queue.wake(name)

    assert drain_id not in (None, dead, live)
    assert live_leases(redis, name) == [drain_id]
    assert not redis.exists(queue.claimed_key(name, dead))
    assert not redis.exists(queue.claimed_key(name, live))
    assert queue.pending(name) == 5
    assert sorted(item["n"] for item in queue.claim(name, drain_id, 10)) == [1, 2, 3, 4, 5]


def test_wake_makes_due_retries_ready_and_leaves_later_ones(redis, name):
    schedule(redis, name, {"n": "due"}, -1)
    schedule(redis, name, {"n": "later"}, 3600)

    drain_id = queue.wake(name)

    assert drain_id is not None
    assert ready(redis, name) == [{"n": "due"}]
    assert [item for item, _ in delayed(redis, name)] == [{"n": "later"}]
    assert live_leases(redis, name) == [drain_id]


def test_wake_starts_a_drain_only_when_work_waits_and_a_lease_is_free(redis, name):
    with max_drains(1):
        assert queue.wake(name) is None  # nothing at all
        schedule(redis, name, {"n": "later"}, 3600)
        assert queue.wake(name) is None  # nothing due
        assert live_leases(redis, name) == []

        drain_id = leased(name, items(1))
        assert queue.wake(name) is None  # work waits, but its drain runs

        queue.forget(name, drain_id)  # that drain could not be started
        woken = queue.wake(name)
        assert woken not in (None, drain_id)
        assert live_leases(redis, name) == [woken]
        assert queue.wake(name) is None  # the new lease counts


# pending


def test_pending_counts_ready_delayed_and_claimed_items(redis, name):
    first = leased(name, items(1, 2, 3, 4, 5))
    assert queue.claim(name, first, 2) == items(1, 2)
    assert queue.claim(name, holding(redis, name, "second"), 1) == items(3)
    expire(redis, name, first)  # dead, not yet recovered: its items still count
    schedule(redis, name, {"n": "retry"}, 3600)

    assert queue.pending(name) == 6
    assert queue.pending(f"{name}-other") == 0


def test_queues_are_namespaced_by_key_prefix(redis, name):
    other = f"{settings.TOOT['KEY_PREFIX']}other:"  # still under the run's, which `redis` cleans
    mine = leased(name, items("mine"))

    with override_settings(TOOT={**settings.TOOT, "KEY_PREFIX": other}):
        assert queue.pending(name) == 0
        with pytest.raises(LeaseLost):  # the lease is under the other prefix
            queue.claim(name, mine, 10)
        queue.push(name, items("theirs"))
        assert queue.pending(name) == 1

    assert queue.claim(name, mine, 10) == items("mine")
    assert redis.llen(f"{other}queue:{{{other}{name}}}:ready") == 1


def test_every_key_of_a_queue_is_in_one_cluster_slot(name):
    # Redis Cluster runs a script only on keys of one slot: the braced part decides it, and
    # names the project, whose queues spread over slots apart from another's.
    keys = [*queue._keys(name), queue.claimed_key(name, "drain")]
    assert {key.split("{")[1].split("}")[0] for key in keys} == {conf.KEY_PREFIX + name}
    assert len({key_slot(key.encode()) for key in keys}) == 1
