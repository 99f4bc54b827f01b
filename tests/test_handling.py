"""Running local handlers at most once per event, against the real Redis."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import time
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from toot import deadletters, handling
from toot.events import Event
from toot.handling import (
    CLAIM_SECONDS,
    DONE,
    AlreadyRunning,
    handler_name,
    handlers_by_name,
    run,
    run_many,
)
from toot.models import DeadLetter
from toot.registry import subscribe

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


def hold_claim(redis, event, name):
    """What another worker running the handler holds."""
    redis.set(handling._claim_key(event, name), "1", ex=CLAIM_SECONDS)


def mark_done(redis, event, name):
    """What another worker leaves once it ran the handler."""
    redis.delete(handling._claim_key(event, name))
    redis.hset(handling._done_key(event), handling._field(event, name), 1)


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
            assert 1234 < redis.ttl(handling._done_key(event)) <= 1234 + handling.HOUR

        with caplog.at_level(logging.INFO, logger="toot.handling"):
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
    assert 0 < ttl <= CLAIM_SECONDS


def test_a_raising_handler_is_reported_and_released_for_a_later_run(redis, caplog):
    calls: list[str] = []
    good, flaky = recorder(calls, "good"), recorder(calls, "flaky", fail_times=1)
    subscribe("publisher", "users.updated.v1", good)
    subscribe("publisher", "users.updated.v1", flaky)
    event = new_event()

    with caplog.at_level(logging.ERROR, logger="toot.handling"):
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


def test_a_claim_left_by_a_dead_worker_expires_and_the_handler_runs(redis, eventually):
    calls: list[str] = []
    handler = recorder(calls, "orphaned")
    subscribe("publisher", "users.updated.v1", handler)
    event = new_event()
    claim = handling._claim_key(event, handler_name(handler))
    redis.set(claim, "1", px=300)  # its worker was killed

    assert isinstance(run(event)[handler_name(handler)], AlreadyRunning)
    eventually(lambda: run(event) == {}, what="the orphaned claim to expire")
    assert calls == ["orphaned"]


def test_dedupe_keys_are_under_key_prefix(redis):
    calls: list[str] = []
    subscribe("publisher", "users.updated.v1", recorder(calls, "one"))
    event = new_event()
    other = f"{settings.TOOT['KEY_PREFIX']}other:"

    with override_settings(TOOT={**settings.TOOT, "KEY_PREFIX": other}):
        assert handling._done_key(event).startswith(other)
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


def test_a_claim_older_than_half_its_time_is_checked_and_renewed_before_its_handler(
    redis, monkeypatch
):
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(
        handling, "time", SimpleNamespace(monotonic=lambda: clock.now, time=time.time)
    )
    first, second, third = new_event(), new_event(), new_event()
    ran: list[Event] = []
    ttls: list[int] = []

    def slow(event):
        ran.append(event)
        claim = functools.partial(handling._claim_key, name=handler_name(slow))
        if event == first:
            clock.now += CLAIM_SECONDS  # the batch's other claims ran out meanwhile,
            redis.set(claim(second), "another run", ex=60)  # a retry elsewhere took one
            redis.delete(claim(third))  # and nobody the other
        else:
            ttls.append(redis.ttl(claim(event)))

    subscribe("publisher", "users.updated.v1", slow)
    name = handler_name(slow)

    failures = run_many([(first, None), (second, None), (third, None)])

    assert ran == [first, third]
    assert list(failures[1]) == [name]
    assert isinstance(failures[1][name], AlreadyRunning)
    assert redis.get(handling._claim_key(second, name)) == b"another run"
    assert failures[2] == {}
    assert ttls and ttls[0] > CLAIM_SECONDS - 10  # taken again for a whole claim
    assert handling.state(third, name) == DONE


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
    return handling.process(items, lambda: None)


def test_process_keeps_the_drains_lease_alive_before_each_handler(redis):
    ran: list[str] = []
    subscribe("publisher", "users.updated.v1", lambda event: ran.append("first"))
    subscribe("publisher", "users.updated.v1", lambda event: ran.append("second"))
    kept_alive: list[int] = []

    handling.process(
        [item_for(Event(CHANNEL, {"n": n})) for n in range(3)],
        lambda: kept_alive.append(len(ran)),
    )

    # A batch of slow handlers must not outlast the lease: renewed before each one.
    assert kept_alive == [0, 1, 2, 3, 4, 5]


def test_process_runs_the_handlers_of_every_item_and_schedules_nothing(redis, caplog):
    calls: list[str] = []
    subscribe("publisher", "users.updated.v1", recorder(calls, "only"))
    events = [new_event() for _ in range(3)]

    with caplog.at_level(logging.INFO, logger="toot.handling"):
        assert process([item_for(event) for event in events]) == []

    assert calls == ["only"] * 3
    handled = [r.getMessage() for r in caplog.records if r.getMessage().endswith(": handled")]
    assert handled == [f"Event {event.id} on {CHANNEL}: handled" for event in events]


def test_a_handler_that_raised_is_retried_alone_with_its_attempts(redis, caplog):
    calls: list[str] = []
    good, flaky = recorder(calls, "good"), recorder(calls, "flaky", fail_times=2)
    subscribe("publisher", "users.updated.v1", good)
    subscribe("publisher", "users.updated.v1", flaky)
    event = new_event()
    before = timezone.now()

    with caplog.at_level(logging.WARNING, logger="toot.handling"):
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
        event.id in r.getMessage() and "retrying them" in r.getMessage() for r in caplog.records
    )

    # The queue hands the retry back as it was scheduled, through JSON.
    [(again, delay)] = process([json.loads(json.dumps(retry))])
    assert again == {**retry, "attempts": 2}  # the first attempt's time is kept
    assert 0.16 <= delay <= 0.24

    assert process([again]) == []
    assert calls == ["good", "flaky", "flaky", "flaky"]


def test_a_held_claim_is_retried_later_and_then_skipped(redis):
    calls: list[str] = []
    handler = recorder(calls, "busy")
    subscribe("publisher", "users.updated.v1", handler)
    event = new_event()
    name = handler_name(handler)
    hold_claim(redis, event, name)  # another drain runs it

    [(retry, _)] = process([item_for(event)])

    assert (retry["handlers"], retry["attempts"]) == ([name], 1)
    mark_done(redis, event, name)  # that drain finished
    assert process([retry]) == []
    assert calls == []


def test_the_same_event_twice_in_one_batch_runs_its_handlers_once(redis):
    """The publisher retried a delivery whose answer was lost: both copies are queued."""
    calls: list[str] = []
    subscribe("publisher", "users.updated.v1", recorder(calls, "once"))
    event = new_event()

    retries = process([item_for(event), item_for(event)])

    assert calls == ["once"]
    # The second copy met the first's claim; its retry finds the handler done.
    assert [retry["attempts"] for retry, _ in retries] == [1]
    assert process([retry for retry, _ in retries]) == []
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
    subscribe("publisher", "users.updated.v1", recorder(calls, "once"))
    event = Event(CHANNEL, {"id": 1}, timestamp=timezone.now() - age)

    with override_settings(TOOT={**settings.TOOT, "DEDUPE_TTL": 1234}):
        assert run(event) == {}
        assert run(event) == {}  # deduped all the same

    assert calls == ["once"]
    assert 1234 + low - 5 <= redis.ttl(handling._done_key(event)) <= 1234 + high


def test_a_done_mark_is_a_16_byte_field_of_its_hours_hash(redis):
    subscribe("publisher", "users.updated.v1", lambda event: None)
    stamp = timezone.now()
    events = [Event(CHANNEL, {"id": n}, timestamp=stamp) for n in range(3)]

    for event in events:
        assert run(event) == {}

    [done] = {handling._done_key(event) for event in events}  # one hash for the hour
    assert redis.hlen(done) == 3
    assert {len(field) for field in redis.hkeys(done)} == {16}
    prefix = settings.TOOT["KEY_PREFIX"]
    assert not list(redis.scan_iter(match=f"{prefix}handled:running:*"))  # claims are gone
