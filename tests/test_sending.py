"""The publisher's deliveries (toot.publisher.sending): fan out, batches, retries, real HTTP peers.

``process`` fans items out into the lanes as a drain calls it, on items as the ``out``
queue holds them, against the real Redis store; the tests then send the lanes' claims
in their own thread, as a sender thread does (tests.utils.send_due), or let the real
worker's senders do it (the last tests).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
import secrets
import threading
import uuid

import pytest
import standardwebhooks
from django.conf import settings

import toot
from tests.http_server import HTTPServer, Reply, in_order
from tests.utils import (
    WatchedLease,
    callback_urls,
    patch_toot,
    relaying_lanes,
    send_due,
    toot_settings,
)
from toot.engine import queue
from toot.models import DeadLetter
from toot.protocol.events import Event, batch_body, wire_json
from toot.publisher import lanes, sending, store
from toot.publisher.sending import Delivery

PREFIX = "org.example.test."
STAMP = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)
FIRST_ATTEMPT = "2026-01-02T03:04:05+00:00"
BATCH_ID = re.compile(r"[0-9a-f]{32}")
EMPTY_BATCH = len(b'{"events":[]}')


@pytest.fixture(autouse=True)
def _no_sender_at_work(no_drain_at_work):
    """The worker's senders run while a drain of the out queue does: none takes a test's
    lanes from under it."""


@pytest.fixture(autouse=True)
def _lanes_relayed(request):
    """Where the worker runs, its relay sends the lanes' retries due after a drain ended."""
    if "celery_worker" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("celery_worker")
    with relaying_lanes():
        yield


@pytest.fixture
def channel():
    """A channel of the test's own: events still in flight from other tests never match it."""
    return f"{PREFIX}{uuid.uuid4().hex[:8]}.v1"


@pytest.fixture
def secret():
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def make_events(channel, count, pad=0):
    """Events whose wire JSON all have the same length (ids are uuid4s, one timestamp)."""
    return [Event(channel, {"pad": "x" * pad}, timestamp=STAMP).to_dict() for _ in range(count)]


def new(events):
    """The items publish() pushes onto the out queue."""
    return [{"event": event} for event in events]


def ids(events):
    return [event["id"] for event in events]


def batch_sizes(deliveries):
    return [len(delivery.events) for delivery in deliveries]


def plan(items):
    """The deliveries claimed items make: fanned out to their URLs' lanes, and each lane
    planned whole, as one claim of all its items would be."""
    by_url = sending.fan_out(json.loads(json.dumps(items)))
    return [delivery for url, (_, lane) in by_url.items() for delivery in sending.plan(url, lane)]


def process(items, keep_alive=lambda: None):
    """sending.process as a drain calls it, items through JSON as the queue holds them,
    then the lanes sent until nothing is due; the retries the claims scheduled."""
    items = json.loads(json.dumps(items))
    assert sending.process(items, WatchedLease(name=queue.OUT)) == []  # none of its own
    return send_due(keep_alive)


def verified(request, secret):
    return standardwebhooks.Webhook(secret).verify(request.body, dict(request.headers.items()))


# fan_out() and plan(): what to send -----------------------------------------------------


def test_plan_fans_each_new_event_out_to_every_subscriber_of_its_channel(redis, caplog):
    a, b, unheard = (f"{PREFIX}{uuid.uuid4().hex[:8]}.v1" for _ in range(3))
    store.add(a, "http://two.example/cb")
    store.add(a, "http://one.example/cb")
    store.add(b, "http://one.example/cb")
    store.add(f"{b}.elsewhere", "http://three.example/cb")
    [a1, a2], [b1], [c1] = make_events(a, 2), make_events(b, 1), make_events(unheard, 1)

    with caplog.at_level(logging.INFO, logger="toot.publisher.sending"):
        deliveries = plan(new([a1, b1, c1, a2]))

    assert sorted(
        (
            (d.url, d.channel, d.events, d.batch, d.id, d.body, d.attempts, d.first_attempt_at)
            for d in deliveries
        ),
        key=str,
    ) == sorted(
        (
            (url, event["channel"], [event], False, event["id"], wire_json(event).encode(), 0, None)
            for url, event in [
                ("http://one.example/cb", a1),
                ("http://one.example/cb", a2),
                ("http://two.example/cb", a1),
                ("http://two.example/cb", a2),
                ("http://one.example/cb", b1),
            ]
        ),
        key=str,
    )
    assert f"Event {a1['id']} on {a}: sending to 2 subscribers" in caplog.text
    assert f"Event {c1['id']} on {unheard}: sending to 0 subscribers" in caplog.text


def test_plan_of_events_nobody_subscribed_to_is_nothing(redis, channel):
    assert plan([]) == []
    assert plan(new(make_events(channel, 3))) == []


def test_a_batch_url_gets_the_channel_s_events_in_one_body(redis, channel):
    store.add(channel, "http://batch.example/cb", batch=True)
    store.add(channel, "http://single.example/cb")
    events = make_events(channel, 3)

    deliveries = plan(new(events))

    [batch] = [d for d in deliveries if d.batch]
    assert (batch.url, batch.channel, batch.events) == ("http://batch.example/cb", channel, events)
    assert batch.body == b'{"events":[' + ",".join(map(wire_json, events)).encode() + b"]}"
    assert json.loads(batch.body) == {"events": events}
    assert BATCH_ID.fullmatch(batch.id)  # the batch's own id, not one of its events'
    assert (batch.attempts, batch.first_attempt_at) == (0, None)
    singles = [d for d in deliveries if not d.batch]
    assert [(d.url, d.id, json.loads(d.body)) for d in singles] == [
        ("http://single.example/cb", event["id"], event) for event in events
    ]


def test_a_batch_holds_the_events_of_one_channel(redis, channel):
    other = channel + ".other"
    store.add(channel, "http://batch.example/cb", batch=True)
    store.add(other, "http://batch.example/cb", batch=True)
    [a1, a2, a3], [b1] = make_events(channel, 3), make_events(other, 1)

    deliveries = plan(new([a1, b1, a2, a3]))

    assert sorted((d.channel, ids(d.events)) for d in deliveries) == sorted(
        [(channel, ids([a1, a2, a3])), (other, ids([b1]))]
    )
    for delivery in deliveries:
        assert {event["channel"] for event in json.loads(delivery.body)["events"]} == {
            delivery.channel
        }


def test_batches_are_cut_at_batch_max_events(redis, channel):
    store.add(channel, "http://batch.example/cb", batch=True)
    events = make_events(channel, 7)

    with toot_settings(BATCH_MAX_EVENTS=3):
        deliveries = plan(new(events))

    assert batch_sizes(deliveries) == [3, 3, 1]
    assert [event for d in deliveries for event in d.events] == events  # in order, none lost
    assert [json.loads(d.body)["events"] for d in deliveries] == [d.events for d in deliveries]
    assert len({d.id for d in deliveries}) == 3


def test_batches_are_cut_at_batch_max_bytes(redis, channel, monkeypatch):
    store.add(channel, "http://batch.example/cb", batch=True)
    events = make_events(channel, 7, pad=100)
    size = len(wire_json(events[0]))
    # The whole body counts: three events, the commas between them and {"events":[]} fit.
    limit = EMPTY_BATCH + 3 * size + 2
    monkeypatch.setattr(sending, "BATCH_MAX_BYTES", limit)

    deliveries = plan(new(events))

    assert batch_sizes(deliveries) == [3, 3, 1]
    assert [event for d in deliveries for event in d.events] == events
    for delivery in deliveries:
        assert len(delivery.body) <= limit
        assert json.loads(delivery.body) == {"events": delivery.events}

    monkeypatch.setattr(sending, "BATCH_MAX_BYTES", EMPTY_BATCH + 3 * size + 1)
    assert batch_sizes(plan(new(events))) == [2, 2, 2, 1]

    with toot_settings(BATCH_MAX_EVENTS=2):  # whichever limit comes first
        monkeypatch.setattr(sending, "BATCH_MAX_BYTES", 10 * size)
        assert batch_sizes(plan(new(events))) == [2, 2, 2, 1]


def test_an_event_bigger_than_batch_max_bytes_goes_alone_in_its_batch(redis, channel, monkeypatch):
    store.add(channel, "http://batch.example/cb", batch=True)
    small = make_events(channel, 3)
    [big] = make_events(channel, 1, pad=1000)
    monkeypatch.setattr(sending, "BATCH_MAX_BYTES", 3 * len(wire_json(small[0])) + 2)
    events = [small[0], big, small[1], small[2]]

    deliveries = plan(new(events))

    assert [d.events for d in deliveries] == [[small[0]], [big], [small[1], small[2]]]
    assert json.loads(deliveries[1].body) == {"events": [big]}


def test_batch_urls_get_the_same_bodies_each_batch_under_its_own_id(redis, channel):
    store.add(channel, "http://first.example/cb", batch=True)
    store.add(channel, "http://second.example/cb", batch=True)
    events = make_events(channel, 5)

    with toot_settings(BATCH_MAX_EVENTS=2):
        deliveries = plan(new(events))

    first = [d for d in deliveries if d.url == "http://first.example/cb"]
    second = [d for d in deliveries if d.url == "http://second.example/cb"]
    assert [d.body for d in first] == [d.body for d in second]
    assert batch_sizes(first) == [2, 2, 1]
    assert len({d.id for d in deliveries}) == 6
    assert all(BATCH_ID.fullmatch(d.id) for d in deliveries)


@pytest.mark.parametrize("batch", [True, False])
def test_a_retry_item_round_trips_to_the_same_delivery(redis, channel, batch):
    store.add(channel, "http://peer.example/cb", batch=batch)
    [delivery, *_] = plan(new(make_events(channel, 2)))
    retry = Delivery(**{**vars(delivery), "attempts": 2, "first_attempt_at": FIRST_ATTEMPT})

    item = json.loads(json.dumps(retry.as_item()))  # as the queue holds it
    again = Delivery.from_item(item["delivery"])

    assert again == retry
    assert (again.body, again.id) == (delivery.body, delivery.id)
    # A retry is sent as it was planned, whatever the subscriptions say now.
    store.remove(channel, "http://peer.example/cb")
    assert plan([item]) == [retry]


def test_plan_takes_retries_and_new_events_together(redis, channel):
    store.add(channel, "http://peer.example/cb")
    old, fresh = make_events(channel, 2)
    [retry] = plan(new([old]))
    retry_item = Delivery(**{**vars(retry), "attempts": 1}).as_item()

    deliveries = plan([*new([fresh]), retry_item])

    assert [(d.id, d.attempts) for d in deliveries] == [(old["id"], 1), (fresh["id"], 0)]


# process(): sending against real peers -----------------------------------------------------


def test_process_sends_single_events_and_batches_signed_by_their_id(redis, channel, secret):
    events = make_events(channel, 3)
    kept_alive = []
    with HTTPServer() as single, HTTPServer() as batch, toot_settings(SIGNING_SECRETS=[secret]):
        store.add(channel, single.url)
        store.add(channel, batch.url, batch=True)

        assert process(new(events), lambda: kept_alive.append(1)) == []

    assert [verified(request, secret) for request in single.requests] == events
    assert [r.headers["webhook-id"] for r in single.requests] == ids(events)
    [request] = batch.requests
    assert verified(request, secret) == {"events": events}
    assert BATCH_ID.fullmatch(request.headers["webhook-id"])
    assert request.headers["Content-Type"] == "application/json"
    assert len(kept_alive) == 4  # before each request: a long claim keeps its lease


def test_a_failed_batch_is_retried_whole_under_the_same_webhook_id(redis, channel, secret, caplog):
    events = make_events(channel, 3)
    replies = in_order(Reply(503, body=b"busy"), Reply(200))
    with HTTPServer(replies) as peer, toot_settings(SIGNING_SECRETS=[secret]):
        store.add(channel, peer.url, batch=True)

        with caplog.at_level(logging.WARNING, logger="toot.publisher.sending"):
            [(item, delay)] = process(new(events))
        assert 0.08 <= delay <= 0.12  # RETRY_SCHEDULE[0] of the tests, 0.1 s, ±20 %
        retry = item["delivery"]
        assert (retry["url"], retry["events"], retry["batch"], retry["attempts"]) == (
            peer.url,
            events,
            True,
            1,
        )
        assert dt.datetime.fromisoformat(retry["first_attempt_at"]).tzinfo is not None

        assert process([item]) == []

    first, second = peer.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == retry["id"]
    assert first.body == second.body
    assert verified(first, secret) == verified(second, secret) == {"events": events}
    [warning] = caplog.records
    message = warning.getMessage()
    assert f"Events {', '.join(ids(events))} on {channel} (batch {retry['id']})" in message
    assert "attempt 1, status 503: busy" in message


def test_a_retry_that_fails_again_keeps_its_id_and_first_attempt_time(redis, channel):
    [event] = make_events(channel, 1)
    with HTTPServer(Reply(500)) as peer:
        item = Delivery(
            peer.url, channel, [event], False, event["id"], b"", 1, FIRST_ATTEMPT
        ).as_item()

        [(again, delay)] = process([item])

    assert again["delivery"] == {**item["delivery"], "attempts": 2}
    assert 0.16 <= delay <= 0.24
    assert peer.requests[0].json() == event  # the body is rebuilt from the events


@pytest.mark.parametrize(
    "failure", [Reply(500, body=b"down"), Reply(hang=True)], ids=["error", "timeout"]
)
def test_a_url_that_failed_is_not_tried_again_in_the_same_claim(redis, channel, failure):
    events = make_events(channel, 3)
    with (
        HTTPServer(failure) as down,
        HTTPServer() as up,
        toot_settings(READ_TIMEOUT=0.3),
    ):
        store.add(channel, down.url)
        store.add(channel, up.url)

        retries = process(new(events))

        assert len(down.requests) == 1  # one timeout, not one per event
        assert [r.json() for r in up.requests] == events
        assert [(item["delivery"]["url"], item["delivery"]["id"]) for item, _ in retries] == [
            (down.url, event["id"]) for event in events
        ]
        assert {item["delivery"]["attempts"] for item, _ in retries} == {1}

        down.reply = Reply(200)
        assert process([item for item, _ in retries]) == []
        assert [r.json() for r in down.requests[1:]] == events


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_refusal_of_one_body_holds_back_none_of_the_url_s_other_deliveries(
    redis, channel, status
):
    events = make_events(channel, 3)

    def refuse_the_second(request):
        return Reply(status if request.json()["id"] == events[1]["id"] else 200)

    with HTTPServer(refuse_the_second) as peer:
        store.add(channel, peer.url)

        retries = process(new(events))

    assert [r.json() for r in peer.requests] == events  # each was sent
    assert [item["delivery"]["id"] for item, _ in retries] == [events[1]["id"]]


def test_a_failed_batch_holds_back_the_url_s_other_batches(redis, channel, secret, monkeypatch):
    events = make_events(channel, 3)
    # One claim takes the three events; two fit in a body.
    monkeypatch.setattr(sending, "BATCH_MAX_BYTES", EMPTY_BATCH + 2 * len(wire_json(events[0])) + 1)
    with HTTPServer(Reply(502)) as peer, toot_settings(SIGNING_SECRETS=[secret]):
        store.add(channel, peer.url, batch=True)

        retries = process(new(events))

        [sent] = peer.requests
        assert sent.json() == {"events": events[:2]}
        assert [item["delivery"]["events"] for item, _ in retries] == [events[:2], events[2:]]
        first, second = (item["delivery"]["id"] for item, _ in retries)
        assert sent.headers["webhook-id"] == first != second


def test_a_failing_url_fails_alone_and_the_others_are_sent(redis, channel):
    """The outcome is remembered per URL: one subscriber's failure costs the others nothing."""
    events = make_events(channel, 2)
    with HTTPServer(Reply(500)) as down, HTTPServer() as up:
        store.add(channel, down.url, batch=True)
        store.add(channel, up.url, batch=True)

        [(item, _)] = process(new(events))

    assert item["delivery"]["url"] == down.url
    assert [r.json() for r in up.requests] == [{"events": events}]


@pytest.mark.django_db
@pytest.mark.parametrize("batch", [True, False])
def test_gone_unsubscribes_and_ends_the_url_s_deliveries(redis, channel, batch):
    events = make_events(channel, 3)
    with HTTPServer(Reply(410)) as gone, HTTPServer() as staying:
        store.add(channel, gone.url, batch=batch)
        store.add(channel, staying.url)

        assert process(new(events)) == []

        assert len(gone.requests) == 1
        assert len(staying.requests) == 3
    assert store.subscribers([channel]) == {channel: [(staying.url, False)]}
    assert not DeadLetter.objects.exists()


def test_x_toot_unsubscribe_unsubscribes_after_delivering(redis, channel):
    events = make_events(channel, 2)
    with HTTPServer(Reply(200, headers={"X-Toot-Unsubscribe": "true"})) as leaving:
        store.add(channel, leaving.url, batch=True)

        assert process(new(events)) == []

        assert [r.json() for r in leaving.requests] == [{"events": events}]
    assert callback_urls(channel) == []


def test_a_subscriber_s_retry_after_is_honoured(redis, channel):
    with HTTPServer(Reply(429, headers={"Retry-After": "30"})) as peer:
        store.add(channel, peer.url, batch=True)

        [(_, delay)] = process(new(make_events(channel, 2)))

    assert delay == 30.0  # the schedule says 0.1 s


@pytest.mark.django_db
def test_a_refused_url_dead_letters_every_event_of_the_batch_at_once(redis, channel):
    events = make_events(channel, 3)
    with (
        HTTPServer() as peer,
        toot_settings(ALLOWED_CALLBACK_HOSTS=[], ALLOWED_CALLBACK_NETWORKS=[], BATCH_MAX_EVENTS=2),
    ):
        store.add(channel, peer.url, batch=True)

        assert process(new(events)) == []

        assert peer.requests == []
    letters = DeadLetter.objects.order_by("id")
    assert [(letter.event, letter.callback_url) for letter in letters] == [
        (event, peer.url) for event in events
    ]
    for letter in letters:
        assert (letter.kind, letter.attempts, letter.last_status) == ("delivery", 1, None)
        assert "must be an https URL" in letter.last_error
    assert callback_urls(channel) == [peer.url]  # refused, not unsubscribed


@pytest.mark.django_db
def test_a_spent_schedule_dead_letters_each_event_of_the_batch(redis, channel):
    events = make_events(channel, 3)
    last = len(settings.TOOT["RETRY_SCHEDULE"])
    with HTTPServer(Reply(500, body=b"still broken")) as peer:
        body = batch_body(map(wire_json, events))
        item = Delivery(peer.url, channel, events, True, "b" * 32, body, last, FIRST_ATTEMPT)

        assert process([item.as_item()]) == []

        [request] = peer.requests
    assert request.json() == {"events": events}
    letters = DeadLetter.objects.order_by("id")
    assert [letter.event for letter in letters] == events
    for letter in letters:
        assert (letter.callback_url, letter.attempts) == (peer.url, last + 1)
        assert (letter.last_status, letter.last_error) == (500, "still broken")
        assert letter.first_attempt_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def test_a_dead_letter_that_cannot_be_written_holds_back_only_its_delivery(redis, channel, caplog):
    # No django_db mark: the database refuses this test, as it would while it is down.
    events = make_events(channel, 2)
    with (
        HTTPServer(Reply(500)) as down,
        HTTPServer() as up,
        toot_settings(RETRY_SCHEDULE=[]),  # the first failure is dead-lettered
    ):
        store.add(channel, down.url)
        store.add(channel, up.url)

        retries = process(new(events))

    assert [r.json() for r in up.requests] == events  # sent once, not put back
    assert [(item["delivery"]["url"], delay) for item, delay in retries] == [
        (down.url, queue.FAILED_WORK_DELAY)
    ] * 2
    assert {item["delivery"]["attempts"] for item, _ in retries} == {0}  # not counted
    assert "cannot record its outcome" in caplog.text


@pytest.mark.django_db
def test_an_empty_schedule_dead_letters_at_the_first_failure(redis, channel):
    [event] = make_events(channel, 1)
    with HTTPServer(Reply(500)) as peer, toot_settings(RETRY_SCHEDULE=[]):
        store.add(channel, peer.url)

        assert process(new([event])) == []

    letter = DeadLetter.objects.get()
    assert (letter.event, letter.attempts) == (event, 1)
    assert letter.first_attempt_at <= letter.last_attempt_at


# Through publish() and the real worker -----------------------------------------------------


def test_published_events_reach_a_batch_subscriber_once_each_despite_a_failure(
    celery_worker, eventually, secret
):
    suffix = f"{uuid.uuid4().hex[:8]}.v1"
    failed: list[str] = []
    lock = threading.Lock()

    def fail_the_first(request):
        with lock:
            if not failed:
                failed.append(request.headers["webhook-id"])
                return Reply(500)
        return Reply(200)

    with HTTPServer(fail_the_first) as peer, toot_settings(SIGNING_SECRETS=[secret]):
        store.add(PREFIX + suffix, peer.url, batch=True)

        published = [toot.publish(suffix, {"n": n}).to_dict() for n in range(5)]

        def delivered():
            requests = peer.requests
            [first] = [i for i, r in enumerate(requests) if r.headers["webhook-id"] in failed][:1]
            del requests[first]  # the one that failed
            return [event for r in requests for event in verified(r, secret)["events"]]

        eventually(lambda: failed and len(delivered()) >= len(published), what="every event")

    assert sorted(ids(delivered())) == sorted(ids(published))  # none twice, none lost
    # The failed batch came again, whole, under its webhook-id.
    failure, retried = [r for r in peer.requests if r.headers["webhook-id"] == failed[0]]
    assert retried.body == failure.body
    assert retried.received_at > failure.received_at


# Claims: several URLs, several requests in flight


def test_a_failing_url_is_tried_once_per_claim(redis, channel):
    events = make_events(channel, 4 * lanes.SINGLE_PER_CLAIM)
    with HTTPServer(Reply(500)) as down:
        store.add(channel, down.url)

        retries = process(new(events))
        # A claim takes SINGLE_PER_CLAIM events alone: four claims, a request each.
        assert len(down.requests) == 4
        assert sorted(item["delivery"]["id"] for item, _ in retries) == sorted(ids(events))

        down.reply = Reply(200)
        assert process([item for item, _ in retries]) == []
        assert sorted(r.json()["id"] for r in down.requests[4:]) == sorted(ids(events))


def test_a_claim_takes_one_url_s_events_up_to_its_share(redis, channel):
    store.add(channel, "http://single.example/cb")
    store.add(channel, "http://batch.example/cb", batch=True)
    events = make_events(channel, lanes.SINGLE_PER_CLAIM + 2)
    with toot_settings(BATCH_MAX_EVENTS=3, MAX_IN_FLIGHT=2):
        assert sending.process(new(events), WatchedLease(name=queue.OUT)) == []
        lanes.renew("test-claims")
        claims = []
        while (reply := lanes.claim("test-claims", queue.new_id(), None)) and reply.claim:
            claims.append(reply.claim)
        taken: dict[str, list[int]] = {}
        for claim in claims:
            taken.setdefault(claim.url, []).append(len(claim.items))
        # Beside a claim still out, only a full one more: the rest waits for it to end.
        assert taken == {
            "http://single.example/cb": [lanes.SINGLE_PER_CLAIM],
            "http://batch.example/cb": [3, 3],
        }
        [ended] = [claim for claim in claims if claim.url == "http://single.example/cb"]
        ended.outcome = lanes.OK
        reply = lanes.claim("test-claims", queue.new_id(), ended)
        assert reply is not None and reply.claim is not None
        assert (reply.claim.url, len(reply.claim.items)) == ("http://single.example/cb", 2)


def test_a_burst_to_one_subscriber_keeps_up_to_max_in_flight_requests_in_flight(
    celery_worker, eventually, channel, monkeypatch, redis
):
    patch_toot(monkeypatch, SENDERS=8, MAX_IN_FLIGHT=3)  # threads to spare
    answer_now = threading.Event()
    lock = threading.Lock()
    in_flight, most = [0], [0]

    def answer(request):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        answer_now.wait(10)
        with lock:
            in_flight[0] -= 1
        return Reply(200)

    suffix = f"{uuid.uuid4().hex[:8]}.v1"
    count = 8 * lanes.SINGLE_PER_CLAIM
    with HTTPServer(answer) as peer:
        store.add(PREFIX + suffix, peer.url)
        published = [toot.publish(suffix, {"n": n}).to_dict() for n in range(count)]

        b = lanes.base()
        eventually(lambda: in_flight[0] == 3, what="three requests in flight")
        # The URL at its limit: out of the due lanes, its backlog waiting for a request
        # of its own to return, whichever sender threads are idle.
        eventually(
            lambda: (
                redis.zscore(b + "due", peer.url) is None
                and redis.llen(b + "ready:" + peer.url) > 0
                and int(redis.hget(b + "inflight", peer.url) or 0) == 3
            ),
            what="the lane held at its limit",
        )
        answer_now.set()

        eventually(lambda: len(peer.requests) >= count, what="every event")
    assert sorted(r.json()["id"] for r in peer.requests) == sorted(ids(published))
    assert most[0] == 3
