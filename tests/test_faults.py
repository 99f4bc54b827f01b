"""Faults reproduced for real on the example topology (issue: delivery that loses nothing).

Events wait in Redis queues (``toot.engine.queue``) until a drain delivers them; a drain that
dies leaves what it held to the relay once its lease ends, and publishing falls back to
the database outbox only when toot's Redis is unreachable. Each test prints one line of
counts (published, delivered, duplicated, lost); run with ``-s`` to see them.
"""

from __future__ import annotations

import threading
import time

import pytest

from devtools.processes import wait_for
from tests.http_server import HTTPServer
from tests.topology import PREFIX, Topology, attempts, count, event_ids, running
from toot.engine import queue
from toot.subscriber import handling

# The example project as real processes, with SQLite databases of their own.
pytestmark = pytest.mark.processes

CHANNEL = f"{PREFIX}users.deleted.v1"
# The lane of the in queue where the example's handler of users.updated.v1 runs.
UPDATED_LANE = handling.lane("example_app.handlers.user_updated")


@pytest.fixture
def topology(request, redis):
    with running(Topology(request.param["name"], **request.param.get("options", {}))) as topology:
        yield topology


def receipts_of(topology, sent):
    return lambda: count(sent, topology.receipts())


def report(name, counts):
    print(f"\nFAULT {name}: " + " ".join(f"{key}={value}" for key, value in counts.items()))


def assert_no_dead_letters(topology):
    assert (
        topology.count_rows("publisher", "DeadLetter")
        == topology.count_rows("subscriber", "DeadLetter")
        == 0
    )


# Workers killed among several: a lease short enough for a test, claims logged (DEBUG) so
# that the test can find the worker holding a batch, a handler that takes a moment so that
# a batch is held long enough to be killed with, and the retry schedule.
LEASE_SECONDS = 10
WORKERS = 3
CRASH = {
    "name": "crash",
    "options": {
        "retry_schedule": "2,4,8,16,32,64",
        "env": {
            "TOOT_LEASE_SECONDS": str(LEASE_SECONDS),
            "TOOT_LOG_LEVEL": "DEBUG",
            "EXAMPLE_HANDLER_SECONDS": "0.05",
        },
    },
}


def start_more_workers(topology, role):
    for n in range(2, WORKERS + 1):
        topology.start_worker(role, f"{role}-worker-{n}")


def kill_the_worker_of(topology, role, drain):
    victim = topology.worker_running(drain)
    assert victim is not None, f"no worker logged a claim of drain {drain}"
    topology.processes[victim].kill()
    return victim, time.monotonic()


def taken_over(topology, drain):
    """How many claims of ``drain`` the subscriber's other workers logged taking over."""
    line = f"was claimed by drain {drain}, whose lease ended; running it here"
    workers = [p for name, p in topology.processes.items() if name.startswith("subscriber-w")]
    return sum(process.log().count(line) for process in workers)


@pytest.mark.parametrize("topology", [CRASH], indirect=True)
def test_a_publisher_worker_killed_mid_delivery_costs_at_most_its_lease(topology):
    """kill -9, among three, the publisher's worker while a subscriber holds its delivery open.

    The subscriber got that delivery's events, but the publisher never learns it did: they
    are sent again once the lease ends, and the subscriber's dedupe runs each handler once.
    """
    start_more_workers(topology, "publisher")
    held, release, lock = threading.Event(), threading.Event(), threading.Lock()

    def forward_then_hold_the_first(request):
        reply = topology.forward(request)
        with lock:
            first = not held.is_set()
            held.set()
        if first:
            release.wait(60)  # until the worker that asked is dead
        return reply

    with HTTPServer(forward_then_hold_the_first) as proxy:
        topology.unsubscribe(CHANNEL, topology.callback_url)
        topology.subscribe(CHANNEL, proxy.url, batch=True)  # as the example subscriber asks
        sent = topology.publish("users.deleted.v1", {"id": 1}, count=20)
        wait_for(held.is_set, 30, "a delivery to be in flight")
        # The sender pool that sent it holds it until it has an answer: the only one.
        holding = {host: n for host, n in topology.held("publisher").items() if n}
        [(drain, held_then)] = holding.items()

        victim, killed_at = kill_the_worker_of(topology, "publisher", drain)
        release.set()
        counts = receipts_of(topology, sent)

        def forwarded():
            return [i for r in proxy.requests for i in event_ids(r.body)]

        def all_there():
            ids = forwarded()
            sent_again = len(ids) > len(set(ids))
            return sent_again and counts()["lost"] == 0  # and every event was handled

        wait_for(all_there, LEASE_SECONDS + 30, "the held delivery to be sent again")
        wait_for(lambda: topology.pending("publisher", queue.OUT) == 0, 30, "an empty queue")
        seconds = time.monotonic() - killed_at
    report(
        f"kill -9 {victim} mid-delivery",
        {**counts(), "held": held_then, "seconds_after_kill": f"{seconds:.1f}"},
    )
    assert seconds > LEASE_SECONDS - 1  # not before the dead drain's lease ended
    assert counts() == {"published": 20, "delivered": 20, "duplicated": 0, "lost": 0}
    assert set(forwarded()) == {event["id"] for event in sent}  # the held ones came again
    assert "already handled it, skipped" in "".join(
        p.log() for name, p in topology.processes.items() if name.startswith("subscriber-w")
    )
    assert_no_dead_letters(topology)


@pytest.mark.parametrize("topology", [CRASH], indirect=True)
def test_a_subscriber_worker_killed_mid_batch_costs_at_most_its_lease(topology):
    """kill -9, among three, the subscriber's worker whose drain holds 50 events or more.

    The handlers it had claimed but not started run as soon as the relay gives its batch
    back, a lease after the kill; only those that were running at the kill run twice.
    """
    start_more_workers(topology, "publisher")
    start_more_workers(topology, "subscriber")
    sent = topology.publish("users.updated.v1", {"id": 1}, count=300)
    counts = receipts_of(topology, sent)

    def a_big_batch():
        held = topology.claimed("subscriber", UPDATED_LANE)
        big = [d for d, n in held.items() if n >= 50 and topology.worker_running(d)]
        return big and (big[0], held[big[0]])

    wait_for(a_big_batch, 30, "a subscriber's drain to hold 50 events")
    drain, held = a_big_batch()
    handled_then = counts()["delivered"]
    victim, killed_at = kill_the_worker_of(topology, "subscriber", drain)
    deadline = LEASE_SECONDS + 30
    wait_for(lambda: counts()["lost"] == 0, deadline, "every event to reach the handler")
    seconds = time.monotonic() - killed_at
    wait_for(lambda: topology.pending("subscriber", UPDATED_LANE) == 0, 30, "an empty queue")
    dead_letters = topology.count_rows("subscriber", "DeadLetter")
    report(
        f"kill -9 {victim} mid-batch",
        {
            **counts(),
            "held": held,
            "handled_before_kill": handled_then,
            "taken_over": taken_over(topology, drain),
            "seconds_after_kill": f"{seconds:.1f}",
            "dead_letters": dead_letters,
        },
    )
    assert counts()["lost"] == 0
    assert seconds > LEASE_SECONDS - 1  # not before the dead drain's lease ended
    # Run twice: only a handler running at the kill, one per process of the worker's pool.
    assert counts()["duplicated"] <= 2
    assert taken_over(topology, drain) > 0
    assert_no_dead_letters(topology)


@pytest.mark.parametrize(
    "topology", [{"name": "broker", "options": {"own_broker": True}}], indirect=True
)
def test_publish_while_the_broker_is_down_loses_nothing(topology):
    """Only Celery's broker is down: events wait in toot's Redis queue, not the outbox.

    A Redis of the publisher's own, killed; or, when the tests' broker is RabbitMQ, a proxy
    in front of it that closes its port and every connection through it, as a RabbitMQ that
    crashed would."""
    topology.broker.kill()

    sent = topology.publish("users.updated.v1", {"id": 1}, count=100)  # raises nothing
    assert len(sent) == 100
    assert topology.pending("publisher", queue.OUT) == 100
    assert topology.count_rows("publisher", "OutboxEvent") == 0

    topology.broker.start()
    counts = receipts_of(topology, sent)
    wait_for(lambda: counts()["lost"] == 0, 120, "every event to reach the handler")
    report("broker down while publishing", counts())
    assert counts() == {"published": 100, "delivered": 100, "duplicated": 0, "lost": 0}
    wait_for(lambda: topology.pending("publisher", queue.OUT) == 0, 30, "an empty queue")


@pytest.mark.parametrize(
    "topology", [{"name": "store", "options": {"own_store": True}}], indirect=True
)
def test_publish_while_redis_is_down_loses_nothing(topology):
    """toot's Redis (and the broker, when it is that Redis) is down: events wait in the
    outbox."""
    topology.store.kill()

    sent = topology.publish("users.updated.v1", {"id": 1}, count=100)  # raises nothing
    assert len(sent) == 100
    assert topology.count_rows("publisher", "OutboxEvent") == 100

    topology.store.start()
    counts = receipts_of(topology, sent)
    wait_for(lambda: counts()["lost"] == 0, 120, "every event to reach the handler")
    report("Redis down while publishing", counts())
    assert counts() == {"published": 100, "delivered": 100, "duplicated": 0, "lost": 0}
    assert topology.count_rows("publisher", "OutboxEvent") == 0
    wait_for(lambda: topology.pending("publisher", queue.OUT) == 0, 30, "an empty queue")


DOWN = {
    "name": "down",
    "options": {"retry_schedule": "1,1,2,2,4,4,8,8", "env": {"TOOT_BREAKER_SECONDS": "2"}},
}


@pytest.mark.parametrize("topology", [DOWN], indirect=True)
def test_subscriber_down_for_a_while_gets_every_event_once(topology):
    topology.processes["subscriber-web"].stop()
    log = topology.log_from_now("publisher-worker")

    sent = topology.publish("users.updated.v1", {"id": 1}, count=200)

    # Failed attempts open the subscriber's circuit; a probe fails and it opens again.
    def opened_twice():
        text = log()
        return "sending a probe" in text and text.count("circuit open") >= 2

    wait_for(opened_twice, 60, "the circuit to open, probe and open again")
    assert any(not a.ok for a in attempts(log()))
    topology.start_web("subscriber")
    counts = receipts_of(topology, sent)
    wait_for(lambda: counts()["lost"] == 0, 120, "every event to reach the handler")
    report("subscriber down for three retry rounds", counts())
    assert counts() == {"published": 200, "delivered": 200, "duplicated": 0, "lost": 0}
    assert_no_dead_letters(topology)


# The example's own settings: the default RETRY_SCHEDULE (5 s, then 5 min...) and breaker.
RECOVERY = {
    "name": "recovery",
    "options": {"retry_schedule": "5,300,1800,7200,18000,36000,36000"},
}
DOWN_SECONDS = 30.0
BACK_WITHIN = 60.0


@pytest.mark.parametrize("topology", [RECOVERY], indirect=True)
def test_a_subscriber_back_after_30_s_gets_its_backlog_within_a_minute(topology):
    """Its web server down for 30 s while 200 events are published, then back, and one
    more event published: every one is handled within a minute of the restart, once, with
    the default schedule, whose second retry comes five minutes after the first. Its
    circuit opens after five failures in a row; the first delivery after the restart
    closes it and brings its retries forward (toot.publisher.lanes)."""
    topology.processes["subscriber-web"].stop()
    stopped = time.monotonic()
    log = topology.log_from_now("publisher-worker")
    sent = topology.publish("users.updated.v1", {"id": 1}, count=200)
    wait_for(lambda: any(not a.ok for a in attempts(log())), DOWN_SECONDS, "a failure")
    # What an operator sees then (run with -s to read it).
    print("\n" + topology.manage("publisher", "toot_status", "--limit", "5").stdout)
    # Down for the whole 30 s, whatever the publisher does meanwhile.
    wait_for(lambda: time.monotonic() - stopped >= DOWN_SECONDS, 60, "30 s of downtime")
    topology.start_web("subscriber")
    restarted = time.monotonic()
    sent += topology.publish("users.updated.v1", {"id": 2})
    counts = receipts_of(topology, sent)
    left = BACK_WITHIN - (time.monotonic() - restarted)
    wait_for(lambda: counts()["lost"] == 0, left, "every event to reach the handler")
    took = time.monotonic() - restarted
    report(f"subscriber down 30 s, every event handled {took:.1f} s after the restart", counts())
    assert counts() == {"published": 201, "delivered": 201, "duplicated": 0, "lost": 0}
    assert_no_dead_letters(topology)
