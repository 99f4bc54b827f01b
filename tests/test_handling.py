"""Running local handlers at most once per event, against the real Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging

import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from tests.utils import WatchedLease, redis_down, redis_now
from toot import deadletters
from toot.conf import conf
from toot.engine import queue
from toot.exceptions import AlreadyRunning
from toot.models import DeadLetter
from toot.protocol.events import Event
from toot.subscriber import handling
from toot.subscriber.handling import (
    DONE,
    handler_name,
    handlers_by_name,
    run,
    run_many,
)
from toot.subscriber.registry import subscribe

CHANNEL = "org.example.publisher.users.updated.v1"


def on_update(event):
    pass


class CallableHandler:
    def __call__(self, event):
        pass

    def method(self, event):
        pass


def new_event():
    return Event(CHANNEL, {"id": 1})


def hold_claim(redis, event, name, holder="~another-run", ms=60_000):
    """What another process running the handler holds, through its heartbeat."""
    redis.set(handling._claim_key(event, name), holder, px=ms)


def mark_done(redis, event, name):
    """What another worker leaves once it ran the handler."""
    redis.delete(handling._claim_key(event, name))
    redis.hset(handling._done_key(event, name), handling._field(event, name), 1)


def recorder(calls, label, fail_times=0):
    """A handler that appends ``label`` to ``calls``, raising on its first ``fail_times`` runs."""

    def handler(event):
        calls.append(label)
        if calls.count(label) <= fail_times:
            raise RuntimeError(f"{label} failed")

    handler.__qualname__ = f"recorder.{label}"
    return handler


# handler_name and handlers_by_name


def test_handler_name_is_module_and_qualified_name():
    def nested(event):
        pass

    assert handler_name(on_update) == f"{__name__}.on_update"
    assert (
        handler_name(nested)
        == f"{__name__}.test_handler_name_is_module_and_qualified_name.<locals>.nested"
    )
    assert handler_name(CallableHandler().method) == f"{__name__}.CallableHandler.method"


def test_a_callable_object_is_named_by_its_class():
    # Not by its repr, which holds an address that differs in every worker process: the
    # name keys the dedupe marks, the retried handlers and the dead letters.
    first, second = CallableHandler(), CallableHandler()
    assert handler_name(first) == handler_name(second) == f"{__name__}.CallableHandler"
    assert hex(id(first)) not in handler_name(first)
    assert "0x" not in handler_name(functools.partial(on_update))


def test_same_named_handlers_are_told_apart_by_registration_order():
    lambdas = [lambda event: "a", lambda event: "b", lambda event: "c"]
    for handler in lambdas:
        subscribe("publisher", "users.updated.v1", handler)
    subscribe("publisher", "users.updated.v1", on_update)
    subscribe("publisher", "users.deleted.v1", CallableHandler())

    named = handlers_by_name(CHANNEL)

    base = (
        f"{__name__}.test_same_named_handlers_are_told_apart_by_registration_order"
        ".<locals>.<lambda>"
    )
    assert list(named) == [base, f"{base}#2", f"{base}#3", f"{__name__}.on_update"]
    assert list(named.values()) == [*lambdas, on_update]
    assert handlers_by_name("org.example.publisher.nothing.here.v1") == {}


# run()


def test_each_handler_runs_once_and_is_then_remembered_for_dedupe_ttl(redis, caplog):
    calls: list[str] = []
    first, second = recorder(calls, "first"), recorder(calls, "second")
    subscribe("publisher", "users.updated.v1", first)
    subscribe("publisher", "users.updated.v1", second)
    event = new_event()

    with override_settings(TOOT={**settings.TOOT, "DEDUPE_TTL": 1234}):
        assert run(event) == {}
        assert calls == ["first", "second"]
        for handler in (first, second):
            assert handling.state(event, handler_name(handler)) == DONE
            # At least DEDUPE_TTL after the end of the event's hour, counted from now.
            done = handling._done_key(event, handler_name(handler))
            assert 1234 < redis.ttl(done) <= 1234 + handling.HOUR

        with caplog.at_level(logging.INFO, logger="toot.subscriber.handling"):
            assert run(event) == {}  # the publisher retried a delivery that was handled
        assert calls == ["first", "second"]

    skipped = [r.getMessage() for r in caplog.records if "already handled" in r.getMessage()]
    assert len(skipped) == 2
    assert all(event.id in message and CHANNEL in message for message in skipped)


def test_another_event_runs_the_handlers_again(redis):
    calls: list[str] = []
    subscribe("publisher", "users.updated.v1", recorder(calls, "only"))
    assert run(new_event()) == run(new_event()) == {}
    assert calls == ["only", "only"]


def test_the_claim_is_held_while_the_handler_runs(redis):
    seen = []
    event = new_event()

    def look_at_the_claim(event):
        name = handler_name(look_at_the_claim)
        seen.append((handling.state(event, name), redis.ttl(handling._claim_key(event, name))))

    subscribe("publisher", "users.updated.v1", look_at_the_claim)
    assert run(event) == {}
    [(state, ttl)] = seen
    assert state == handling.RUNNING
    assert 0 < ttl <= conf.LEASE_SECONDS  # a run of its own


def test_a_raising_handler_is_reported_and_released_for_a_later_run(redis, caplog):
    calls: list[str] = []
    good, flaky = recorder(calls, "good"), recorder(calls, "flaky", fail_times=1)
    subscribe("publisher", "users.updated.v1", good)
    subscribe("publisher", "users.updated.v1", flaky)
    event = new_event()

    with caplog.at_level(logging.ERROR, logger="toot.subscriber.handling"):
        failures = run(event)

    assert list(failures) == [handler_name(flaky)]
    assert isinstance(failures[handler_name(flaky)], RuntimeError)
    assert str(failures[handler_name(flaky)]) == "flaky failed"
    assert handling.state(event, handler_name(flaky)) is None  # released: a retry may run it
    assert handling.state(event, handler_name(good)) == DONE
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert event.id in record.getMessage()
    assert handler_name(flaky) in record.getMessage()
    assert record.exc_info is not None

    assert run(event) == {}  # the retry: only the handler that failed runs again
    assert calls == ["good", "flaky", "flaky"]
    assert handling.state(event, handler_name(flaky)) == DONE


def test_names_restricts_the_run_to_those_handlers(redis):
    calls: list[str] = []
    first, second = recorder(calls, "first"), recorder(calls, "second")
    subscribe("publisher", "users.updated.v1", first)
    subscribe("publisher", "users.updated.v1", second)
    event = new_event()

    assert run(event, [handler_name(second)]) == {}
    assert calls == ["second"]
    assert handling.state(event, handler_name(first)) is None

    assert run(event, []) == {}
    assert calls == ["second"]


def test_a_handler_no_longer_subscribed_fails_instead_of_passing_silently(redis):
    """After a deploy renamed or removed it, a retry for it must not count as done."""
    event = new_event()

    [(name, error)] = run(event, ["tests.no_such_handler"]).items()

    assert name == "tests.no_such_handler"
    assert isinstance(error, LookupError)
    assert "tests.no_such_handler is not subscribed to" in str(error)


def test_a_held_claim_is_already_running(redis):
    calls: list[str] = []
    handler = recorder(calls, "busy")
    subscribe("publisher", "users.updated.v1", handler)
    event = new_event()
    name = handler_name(handler)
    hold_claim(redis, event, name)  # another worker is running it

    failures = run(event)

    assert list(failures) == [name]
    assert isinstance(failures[name], AlreadyRunning)
    assert event.id in str(failures[name])
    assert calls == []
    assert handling.state(event, name) == handling.RUNNING  # still the other worker's


@pytest.mark.parametrize("fails", [False, True], ids=["succeeded", "raised"])
def test_a_run_that_outlasted_its_claim_leaves_the_next_runs_claim_alone(redis, fails):
    event = new_event()

    def slow(event):
        # The claim expired meanwhile, and a retry on another worker took it.
        redis.set(handling._claim_key(event, handler_name(slow)), "another run", ex=60)
        if fails:
            raise RuntimeError("slow failed")

    subscribe("publisher", "users.updated.v1", slow)
    name = handler_name(slow)

    failures = run(event)

    assert list(failures) == ([name] if fails else [])
    assert redis.get(handling._claim_key(event, name)) == b"another run"
    assert handling.state(event, name) == (DONE if not fails else handling.RUNNING)


def test_a_claim_whose_heartbeat_stopped_expires_and_the_handler_runs(redis, eventually):
    calls: list[str] = []
    handler = recorder(calls, "orphaned")
    subscribe("publisher", "users.updated.v1", handler)
    event = new_event()
    hold_claim(redis, event, handler_name(handler), ms=300)  # its process was killed

    assert isinstance(run(event)[handler_name(handler)], AlreadyRunning)
    eventually(lambda: run(event) == {}, what="the orphaned claim to expire")
    assert calls == ["orphaned"]


def test_a_drain_of_the_in_queue_holds_its_claims_through_the_heartbeat(redis):
    """A replayed dead letter's drain runs every handler of its event: its claims, each in
    its handler's slot, are detached from the start, as another run looks for a claim's
    owner among the leases of the handler's own lane only."""
    held: list[bytes] = []

    def handler(event):
        held.append(redis.get(handling._claim_key(event, handler_name(handler))))
        # Another drain, of the handler's lane, meets it running.
        lane = handling.lane(handler_name(handler))
        [failures] = run_many([(event, None)], WatchedLease(name=lane))
        held.append(type(failures[handler_name(handler)]).__name__.encode())

    subscribe("publisher", "users.updated.v1", handler)
    lease = WatchedLease()

    assert run_many([(new_event(), None)], lease) == [{}]
    assert held == [b"~" + lease.id.encode(), b"AlreadyRunning"]


def test_a_claim_held_by_a_live_drain_of_the_handlers_lane_is_running(redis):
    calls: list[str] = []
    handler = recorder(calls, "laned")
    subscribe("publisher", "users.updated.v1", handler)
    event, name = new_event(), handler_name(handler)
    lane = handling.lane(name)
    redis.zadd(queue.leases_key(lane), {"lane-drain": redis_now(redis) + 60})
    hold_claim(redis, event, name, holder="lane-drain")

    [failures] = run_many([(event, [name])], WatchedLease(name=lane))

    assert isinstance(failures[name], AlreadyRunning)
    assert calls == []


@pytest.mark.parametrize("lease", ["ended", "given back"])
def test_the_claims_of_a_drain_whose_lease_ended_are_taken_over_at_once(redis, caplog, lease):
    """A worker killed mid-batch: the next drain runs what it had claimed, without waiting."""
    calls: list[str] = []
    handler = recorder(calls, "orphaned")
    subscribe("publisher", "users.updated.v1", handler)
    events = [new_event() for _ in range(3)]
    name = handler_name(handler)
    if lease == "ended":  # its score has passed; the relay has not removed it yet
        redis.zadd(queue.leases_key(queue.IN), {"dead-drain": redis_now(redis) - 1})
    for event in events:
        hold_claim(redis, event, name, holder="dead-drain", ms=3_600_000)

    with caplog.at_level(logging.WARNING, logger="toot.subscriber.handling"):
        assert run_many([(event, None) for event in events], WatchedLease()) == [{}, {}, {}]

    assert calls == ["orphaned"] * 3
    assert all(handling.state(event, name) == DONE for event in events)
    taken = [r.getMessage() for r in caplog.records if "whose lease ended" in r.getMessage()]
    assert taken[0] == (
        f"Event {events[0].id} on {CHANNEL}: {name} was claimed by drain dead-drain, whose "
        "lease ended; running it here"
    )
    assert len(taken) == 3


def test_a_drain_claims_under_its_lease_and_its_handler_runs_under_the_heartbeat(redis):
    """Claims not yet started live with the lease; a running one outlives it, held by the
    heartbeat, so that a slow handler never runs twice."""
    first, second = new_event(), new_event()
    seen: list[tuple[bytes | None, bytes | None]] = []
    later: list[dict[str, Exception]] = []

    def slow(event):
        claim = functools.partial(handling._claim_key, name=handler_name(slow))
        if event == first:
            seen.append((redis.get(claim(first)), redis.get(claim(second))))
            handling.heartbeat().beat()  # a beat while it runs
            seen.append((redis.get(claim(first)), redis.get(claim(second))))
            # Its drain's lease has ended (it never was live here): another drain meets
            # the running handler, and takes over the one not started.
            later.extend(run_many([(first, None)], WatchedLease()))

    subscribe("publisher", "users.updated.v1", slow)
    name = handler_name(slow)
    lease = WatchedLease(name=handling.lane(name))
    owner = lease.id.encode()

    failures = run_many([(first, None), (second, None)], lease)

    assert seen == [(owner, owner), (b"~" + owner, owner)]
    assert isinstance(later[0][name], AlreadyRunning)
    assert failures == [{}, {}]
    assert handling.state(first, name) == DONE
    assert not list(redis.scan_iter(match=f"{settings.TOOT['KEY_PREFIX']}handled:*:running:*"))


def test_a_run_outside_a_drain_holds_its_claims_through_the_heartbeat(redis):
    """A dead letter replayed: no lease holds its claims, the heartbeat does from the start."""
    event = new_event()
    held: list[tuple[bytes, int]] = []

    def handler(event):
        claim = handling._claim_key(event, handler_name(handler))
        redis.pexpire(claim, 1000)  # as if the lease were nearly over
        handling.heartbeat().beat()
        held.append((redis.get(claim)[:1], redis.pttl(claim)))

    subscribe("publisher", "users.updated.v1", handler)

    with override_settings(TOOT={**settings.TOOT, "LEASE_SECONDS": 30}):
        assert run(event) == {}

    [(first_byte, ttl)] = held
    assert first_byte == b"~"
    assert 29_000 < ttl <= 30_000  # held a lease more


def test_a_heartbeat_that_cannot_reach_redis_warns_and_keeps_beating(redis, caplog):
    beating = handling.heartbeat()
    with (
        beating.holding({"some-claim": ("owner", "~owner")}),
        redis_down(),
        caplog.at_level(logging.WARNING, logger="toot.subscriber.handling"),
    ):
        beating.beat()
    assert "Cannot renew the claims of running handlers" in caplog.text
    beating.beat()  # holds nothing now: no round trip, nothing to say


def test_dedupe_keys_are_under_key_prefix(redis):
    calls: list[str] = []
    subscribe("publisher", "users.updated.v1", recorder(calls, "one"))
    event = new_event()
    other = f"{settings.TOOT['KEY_PREFIX']}other:"

    with override_settings(TOOT={**settings.TOOT, "KEY_PREFIX": other}):
        assert handling._done_key(event, "x").startswith(other)
        assert handling._claim_key(event, "x").startswith(other)
        assert run(event) == {}
    assert run(event) == {}  # under another prefix, nothing remembers it
    assert calls == ["one", "one"]


# run_many()


def test_run_many_runs_each_handler_once_per_event_across_batches(redis):
    calls: list[tuple[str, str]] = []

    def first(event):
        calls.append(("first", event.id))

    def second(event):
        calls.append(("second", event.id))

    subscribe("publisher", "users.updated.v1", first)
    subscribe("publisher", "users.updated.v1", second)
    one, two, three = new_event(), new_event(), new_event()

    assert run_many([(one, None), (two, None)]) == [{}, {}]
    # The publisher retried the batch that held two (its answer was lost), with three.
    assert run_many([(two, None), (three, None)]) == [{}, {}]

    assert calls == [
        ("first", one.id),
        ("second", one.id),
        ("first", two.id),
        ("second", two.id),
        ("first", three.id),
        ("second", three.id),
    ]


def test_each_run_is_marked_done_before_the_next_handler_runs(redis):
    """A worker killed by a later handler of the batch leaves the earlier ones done."""
    seen: list[tuple[str | None, ...]] = []
    one, two, three = new_event(), new_event(), new_event()

    def handler(event):
        seen.append(tuple(handling.state(e, handler_name(handler)) for e in (one, two, three)))

    subscribe("publisher", "users.updated.v1", handler)

    assert run_many([(one, None), (two, None), (three, None)]) == [{}, {}, {}]

    assert seen == [
        (handling.RUNNING, handling.RUNNING, handling.RUNNING),
        (DONE, handling.RUNNING, handling.RUNNING),
        (DONE, DONE, handling.RUNNING),
    ]


def test_run_many_reports_the_failures_of_each_event_apart(redis):
    calls: list[str] = []
    flaky = recorder(calls, "flaky", fail_times=1)
    subscribe("publisher", "users.updated.v1", flaky)
    subscribe("publisher", "users.deleted.v1", recorder(calls, "other"))
    failing, deleted = new_event(), Event("org.example.publisher.users.deleted.v1")

    failures = run_many([(failing, None), (deleted, None), (new_event(), ["tests.gone"])])

    assert [list(failed) for failed in failures] == [[handler_name(flaky)], [], ["tests.gone"]]
    assert isinstance(failures[2]["tests.gone"], LookupError)
    assert calls == ["flaky", "other"]  # the third event names no handler that exists


def test_run_many_with_nothing_to_run_touches_no_redis(redis):
    subscribe("publisher", "users.updated.v1", lambda event: None)
    event = new_event()

    assert run_many([(event, [])]) == [{}]  # a retry of no handler
    assert run_many([]) == []
    assert not list(redis.scan_iter(match=f"{settings.TOOT['KEY_PREFIX']}handled:*"))


# process(): the subscriber's drain


def item_for(event, **retry):
    return {"event": event.to_dict(), **retry}


def process(items):
    """handling.process as a drain calls it; the retries."""
    return handling.process(items, WatchedLease())


def test_process_keeps_the_drains_lease_alive_before_each_handler(redis):
    ran: list[str] = []
    subscribe("publisher", "users.updated.v1", lambda event: ran.append("first"))
    subscribe("publisher", "users.updated.v1", lambda event: ran.append("second"))
    kept_alive: list[int] = []

    handling.process(
        [item_for(Event(CHANNEL, {"n": n})) for n in range(3)],
        WatchedLease(lambda: kept_alive.append(len(ran))),
    )

    # A batch of slow handlers must not outlast the lease: renewed before each one.
    assert kept_alive == [0, 1, 2, 3, 4, 5]


def test_process_runs_the_handlers_of_every_item_and_schedules_nothing(redis, caplog):
    calls: list[str] = []
    subscribe("publisher", "users.updated.v1", recorder(calls, "only"))
    events = [new_event() for _ in range(3)]

    with caplog.at_level(logging.INFO, logger="toot.subscriber.handling"):
        assert process([item_for(event) for event in events]) == []

    assert calls == ["only"] * 3
    handled = [r.getMessage() for r in caplog.records if ": handled" in r.getMessage()]
    name = "tests.test_handling.recorder.only"
    assert handled == [f"Event {event.id} on {CHANNEL}: handled by {name}" for event in events]


def test_a_handler_that_raised_is_retried_alone_with_its_attempts(redis, caplog):
    calls: list[str] = []
    good, flaky = recorder(calls, "good"), recorder(calls, "flaky", fail_times=2)
    subscribe("publisher", "users.updated.v1", good)
    subscribe("publisher", "users.updated.v1", flaky)
    event = new_event()
    before = timezone.now()

    with caplog.at_level(logging.WARNING, logger="toot.subscriber.handling"):
        [(retry, delay)] = process([item_for(event)])

    assert retry == {
        "event": event.to_dict(),
        "handlers": [handler_name(flaky)],
        "attempts": 1,
        "first_attempt_at": retry["first_attempt_at"],
    }
    assert before <= dt.datetime.fromisoformat(retry["first_attempt_at"]) <= timezone.now()
    assert 0.08 <= delay <= 0.12  # RETRY_SCHEDULE[0] of the tests, 0.1 s, ±20 %
    assert any(
        event.id in r.getMessage() and "retrying in" in r.getMessage() for r in caplog.records
    )

    # The queue hands the retry back as it was scheduled, through JSON.
    [(again, delay)] = process([json.loads(json.dumps(retry))])
    assert again == {**retry, "attempts": 2}  # the first attempt's time is kept
    assert 0.16 <= delay <= 0.24

    assert process([again]) == []
    assert calls == ["good", "flaky", "flaky", "flaky"]


def test_a_handler_running_elsewhere_is_deferred_without_spending_an_attempt(redis, caplog):
    calls: list[str] = []
    handler, other = recorder(calls, "busy"), recorder(calls, "free")
    subscribe("publisher", "users.updated.v1", handler)
    subscribe("publisher", "users.updated.v1", other)
    event = new_event()
    name = handler_name(handler)
    hold_claim(redis, event, name)  # another drain runs it
    item = item_for(event, attempts=2, first_attempt_at="2026-01-02T03:04:05+00:00")

    with caplog.at_level(logging.INFO, logger="toot.subscriber.handling"):
        [(retry, delay)] = process([item])

    assert retry == {**item, "handlers": [name]}  # its attempts unchanged
    assert delay == handling.DEFER_SECONDS
    assert f"Event {event.id} on {CHANNEL}: {name} running elsewhere" in caplog.text
    mark_done(redis, event, name)  # that drain finished
    assert process([retry]) == []
    assert calls == ["free"]


@pytest.mark.django_db
def test_a_handler_running_elsewhere_is_never_dead_lettered(redis):
    handler = recorder([], "busy")
    subscribe("publisher", "users.updated.v1", handler)
    event = new_event()
    hold_claim(redis, event, handler_name(handler))
    spent = item_for(event, attempts=len(settings.TOOT["RETRY_SCHEDULE"]))

    [(retry, _)] = process([spent])  # the schedule is spent, but nothing failed

    assert retry["attempts"] == spent["attempts"]
    assert not DeadLetter.objects.exists()


def test_the_same_event_twice_in_one_batch_runs_its_handlers_once(redis):
    """The publisher retried a delivery whose answer was lost: both copies are queued."""
    calls: list[str] = []
    subscribe("publisher", "users.updated.v1", recorder(calls, "once"))
    event = new_event()

    assert process([item_for(event), item_for(event)]) == []  # the first copy covers both

    assert calls == ["once"]


@pytest.mark.django_db
def test_a_handler_still_failing_when_the_schedule_is_spent_is_dead_lettered(redis):
    calls: list[str] = []
    broken, good = recorder(calls, "broken", fail_times=99), recorder(calls, "good")
    subscribe("publisher", "users.updated.v1", broken)
    subscribe("publisher", "users.updated.v1", good)
    event = new_event()
    last = len(settings.TOOT["RETRY_SCHEDULE"])
    first_attempt_at = "2026-01-02T03:04:05+00:00"
    item = item_for(
        event,
        handlers=[handler_name(broken), "tests.renamed_since"],
        attempts=last,
        first_attempt_at=first_attempt_at,
    )

    assert process([item]) == []

    assert calls == ["broken"]
    letters = {letter.handler: letter for letter in DeadLetter.objects.all()}
    assert sorted(letters) == sorted([handler_name(broken), "tests.renamed_since"])
    for letter in letters.values():
        assert letter.kind == DeadLetter.Kind.HANDLER
        assert (letter.event_id, letter.event) == (event.id, event.to_dict())
        assert letter.attempts == last + 1
        assert letter.first_attempt_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert letters[handler_name(broken)].last_error == "RuntimeError('broken failed')"
    assert letters["tests.renamed_since"].last_error.startswith("LookupError(")


@pytest.mark.django_db
def test_an_empty_schedule_dead_letters_at_the_first_failure(redis):
    def broken(event):
        raise ValueError("bad payload")

    subscribe("publisher", "users.updated.v1", broken)
    event = new_event()

    with override_settings(TOOT={**settings.TOOT, "RETRY_SCHEDULE": []}):
        assert process([item_for(event)]) == []

    letter = DeadLetter.objects.get()
    assert (letter.handler, letter.attempts) == (handler_name(broken), 1)
    assert letter.first_attempt_at <= letter.last_attempt_at


def test_an_event_with_no_handler_here_is_retried_not_dropped(redis):
    # Accepted while subscribed, handled after a deploy removed the subscription (or
    # queued by another project sharing the KEY_PREFIX): not silently "handled".
    event = Event(CHANNEL, {"id": 1})

    [retry] = process([item_for(event)])

    item, delay = retry
    assert item["handlers"] == [handling.ALL]
    assert delay > 0
    ran: list[Event] = []
    subscribe("publisher", "users.updated.v1", ran.append)  # subscribed again
    assert process([item]) == []
    assert ran == [event]


@pytest.mark.django_db
def test_a_dead_letter_for_no_handler_runs_every_handler_once_replayed(redis):
    event = Event(CHANNEL, {"id": 1})
    with override_settings(TOOT={**settings.TOOT, "RETRY_SCHEDULE": []}):
        assert process([item_for(event)]) == []
    letter = DeadLetter.objects.get(event_id=event.id)
    assert letter.handler == handling.ALL
    assert "no handler" in letter.last_error
    ran: list[Event] = []
    subscribe("publisher", "users.updated.v1", ran.append)

    assert deadletters.redeliver(letter) is deadletters.Replay.REDELIVERED
    assert ran == [event]


@pytest.mark.parametrize(
    ("age", "low", "high"),
    [
        (dt.timedelta(days=5), 0, 0),  # a late event: remembered DEDUPE_TTL from now
        (-dt.timedelta(days=365 * 50), 0, handling.HOUR),  # a future one pins nothing for long
    ],
    ids=["late", "future"],
)
def test_done_marks_last_dedupe_ttl_however_old_or_new_the_event(redis, age, low, high):
    calls: list[str] = []
    handler = recorder(calls, "once")
    subscribe("publisher", "users.updated.v1", handler)
    event = Event(CHANNEL, {"id": 1}, timestamp=timezone.now() - age)

    with override_settings(TOOT={**settings.TOOT, "DEDUPE_TTL": 1234}):
        assert run(event) == {}
        assert run(event) == {}  # deduped all the same

    assert calls == ["once"]
    done = handling._done_key(event, handler_name(handler))
    assert 1234 + low - 5 <= redis.ttl(done) <= 1234 + high


def test_a_done_mark_is_a_16_byte_field_of_its_hours_hash(redis):
    def handler(event):
        pass

    subscribe("publisher", "users.updated.v1", handler)
    stamp = timezone.now()
    events = [Event(CHANNEL, {"id": n}, timestamp=stamp) for n in range(3)]

    for event in events:
        assert run(event) == {}

    # One hash for the handler's hour.
    [done] = {handling._done_key(event, handler_name(handler)) for event in events}
    assert redis.hlen(done) == 3
    assert {len(field) for field in redis.hkeys(done)} == {16}
    prefix = settings.TOOT["KEY_PREFIX"]
    assert not list(redis.scan_iter(match=f"{prefix}handled:*:running:*"))  # claims are gone


# async def handlers


def async_recorder(loops):
    """An ``async def`` handler that records the event loop it was awaited on."""

    async def handler(event):
        await asyncio.sleep(0)
        loops.append(asyncio.get_running_loop())

    handler.__qualname__ = "async_recorder"
    return handler


def test_an_async_handler_is_awaited_and_marked_done(redis):
    loops: list[asyncio.AbstractEventLoop] = []
    subscribe("publisher", "users.updated.v1", async_recorder(loops))
    event = new_event()

    assert run(event) == {}
    assert run(event) == {}  # done: not awaited again

    assert len(loops) == 1
    assert loops[0].is_closed()  # outside a drain, a loop of its own for the run
    assert handling.state(event, "tests.test_handling.async_recorder") == DONE


def test_the_async_handlers_of_a_drain_share_one_event_loop_closed_as_it_ends(redis):
    loops: list[asyncio.AbstractEventLoop] = []
    subscribe("publisher", "users.updated.v1", async_recorder(loops))
    subscribe("publisher", "users.updated.v1", on_update)  # a sync one beside it

    with handling.hosting() as busy:
        assert run_many([(new_event(), None), (new_event(), None)]) == [{}, {}]
        assert run_many([(new_event(), None)]) == [{}]
        assert not busy()
        assert not loops[0].is_closed()

    assert len(loops) == 3
    assert all(loop is loops[0] for loop in loops)
    assert loops[0].is_closed()


def test_an_async_handler_that_raises_fails_as_a_sync_one_does(redis):
    async def broken(event):
        raise ValueError("async boom")

    subscribe("publisher", "users.updated.v1", broken)

    [failure] = run(new_event()).values()

    assert isinstance(failure, ValueError)


def test_a_handler_run_from_async_code_is_awaited_in_a_thread_of_its_own(redis):
    loops: list[asyncio.AbstractEventLoop] = []
    subscribe("publisher", "users.updated.v1", async_recorder(loops))

    async def caller():
        return asyncio.get_running_loop(), run(new_event())

    outer, failures = asyncio.run(caller())

    assert failures == {}
    assert loops[0] is not outer


def test_a_worker_awaits_async_handlers_on_one_loop_per_drain(
    client, celery_worker, eventually, redis
):
    loops: list[asyncio.AbstractEventLoop] = []
    subscribe("publisher", "users.updated.v1", async_recorder(loops))
    events = [new_event() for _ in range(3)]

    response = client.post(
        "/toot/callbacks",
        json.dumps({"events": [event.to_dict() for event in events]}),
        content_type="application/json",
    )

    assert response.status_code == 200
    name = "tests.test_handling.async_recorder"
    eventually(
        lambda: all(handling.state(event, name) == DONE for event in events),
        what="the async handler to run for every event",
    )
    assert len(loops) == 3
    assert all(loop is loops[0] for loop in loops)  # one drain claimed the three at once
    eventually(loops[0].is_closed, what="the drain to end and close its loop")
