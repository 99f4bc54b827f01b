"""The lanes of toot.publisher.lanes against the real Redis: in-flight limits, the circuit
breaker, rate limits, disabled URLs and what a dead sender pool held.

Each test has a KEY_PREFIX of its own, so that it sees only its own lanes.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from tests.utils import patch_toot, retry_item
from toot.engine import queue
from toot.engine.connection import get_redis
from toot.models import DeadLetter
from toot.protocol.events import Event, wire_json
from toot.publisher import lanes, sending

URL = "http://127.0.0.1:9/callback"
HOST = "test-pool"


@pytest.fixture(autouse=True)
def own_lanes(monkeypatch, redis, no_drain_at_work):
    """Lanes of the test's own: the new KEY_PREFIX is every thread's, so no drain of the
    tests' worker (and so none of its senders) may be at work."""
    patch_toot(
        monkeypatch,
        KEY_PREFIX=f"{settings.TOOT['KEY_PREFIX']}{uuid.uuid4().hex[:8]}:",
        MAX_IN_FLIGHT=2,
        BREAKER_FAILURES=3,
        BREAKER_SECONDS=30,
    )
    lanes.renew(HOST)


def event_items(count: int, prefix: str = lanes.SINGLE) -> list[str]:
    return [
        prefix + wire_json(Event("org.example.lanes.v1", {"n": n}).to_dict()) for n in range(count)
    ]


def claim(ended: lanes.Claim | None = None, *, take: bool = True) -> lanes.Reply:
    reply = lanes.claim(HOST, queue.new_id(), ended, take=take)
    assert reply is not None
    return reply


def fail(claimed: lanes.Claim) -> lanes.Claim:
    claimed.outcome = lanes.FAILED
    return claimed


def end(claimed: lanes.Claim, outcome: str | None = None) -> str:
    """End the claim (OK unless failed); the transition of its URL's circuit."""
    claimed.outcome = outcome or (lanes.OK if claimed.outcome == lanes.NEUTRAL else claimed.outcome)
    return claim(claimed, take=False).transition


def test_a_url_has_at_most_max_in_flight_claims_and_is_due_again_when_one_ends(redis):
    lanes.push({URL: (False, event_items(4 * lanes.SINGLE_PER_CLAIM))})
    first, second = claim().claim, claim().claim
    assert first is not None and second is not None
    assert len(first.items) == lanes.SINGLE_PER_CLAIM
    third = claim()
    assert third.claim is None and third.wait is None  # at its limit: not due at all
    assert redis.hget(lanes.base() + "inflight", URL) == b"2"
    assert end(first) == ""
    assert claim().claim is not None  # one returned: due again


def test_a_batch_url_s_claim_takes_up_to_batch_max_events(monkeypatch):
    patch_toot(monkeypatch, BATCH_MAX_EVENTS=7)
    lanes.push({URL: (True, event_items(10, lanes.BATCHED))})
    claimed = claim().claim
    assert claimed is not None and len(claimed.items) == 7


def test_urls_take_turns():
    other = URL + "/other"
    lanes.push({URL: (False, event_items(20))})
    lanes.push({other: (False, event_items(20))})
    first = claim().claim
    second = claim(first).claim
    assert first is not None and second is not None
    assert {first.url, second.url} == {URL, other}


def test_failures_in_a_row_open_the_circuit_until_a_probe_closes_it(redis):
    lanes.push({URL: (False, event_items(6 * lanes.SINGLE_PER_CLAIM))})
    transitions = []
    for _ in range(3):
        claimed = claim().claim
        assert claimed is not None
        transitions.append(end(fail(claimed)))
    assert transitions == ["", "", lanes.OPENED]
    reply = claim()
    assert reply.claim is None and reply.wait is not None
    assert 29 < reply.wait <= 30  # nothing is attempted while open
    state = lanes.base() + "state:" + URL
    redis.hset(state, "until", 0)  # BREAKER_SECONDS have passed
    redis.zadd(lanes.base() + "due", {URL: 0})
    probe = claim().claim
    assert probe is not None and probe.probe and len(probe.items) == 1
    assert claim().claim is None  # one probe at a time
    assert end(fail(probe)) == lanes.OPENED  # failed: open again
    redis.hset(state, "until", 0)
    redis.zadd(lanes.base() + "due", {URL: 0})
    probe = claim().claim
    assert probe is not None and probe.probe
    assert end(probe) == lanes.CLOSED
    # Its backlog flows again, one request in flight at first, one more after a success.
    assert redis.hget(state, "limit") == b"1"
    first = claim().claim
    assert first is not None and claim().claim is None
    end(first)
    assert redis.hget(state, "limit") is None  # MAX_IN_FLIGHT (2) reached
    [status] = lanes.status()
    assert (status.mode, status.failures, status.open_until) == ("closed", 0, None)


def test_a_success_resets_the_failures_in_a_row(redis):
    lanes.push({URL: (False, event_items(6 * lanes.SINGLE_PER_CLAIM))})
    for outcome in (lanes.FAILED, lanes.FAILED, lanes.OK, lanes.FAILED, lanes.NEUTRAL):
        claimed = claim().claim
        assert claimed is not None
        assert end(claimed, outcome) == ""
    assert redis.hget(lanes.base() + "state:" + URL, "failures") == b"1"


def test_a_rate_limited_url_is_due_when_its_rate_allows(redis):
    lanes.set_rate(URL, 10)
    lanes.push({URL: (True, event_items(10, lanes.BATCHED))})
    claimed = claim().claim
    assert claimed is not None and len(claimed.items) == 1  # a tenth of a second's worth
    reply = claim(claimed)
    assert reply.claim is None and reply.wait is not None and 0 < reply.wait <= 0.1
    [status] = lanes.status()
    assert status.rate == 10
    lanes.set_rate(URL, None)
    assert redis.hget(lanes.base() + "rates", URL) is None


def test_the_publisher_s_default_rate_applies_to_urls_that_asked_for_none(monkeypatch):
    patch_toot(monkeypatch, CALLBACK_RATE_LIMIT=40)
    lanes.push({URL: (True, event_items(10, lanes.BATCHED))})
    claimed = claim().claim
    assert claimed is not None and len(claimed.items) == 4
    assert claim(claimed).claim is None


def test_a_dead_pool_s_claims_go_back_to_the_front_of_their_lanes(redis):
    items = event_items(lanes.SINGLE_PER_CLAIM + 2)
    lanes.push({URL: (False, items)})
    held = claim().claim
    assert held is not None
    assert lanes.wake() is not None  # its lease is live: it keeps what it holds
    assert redis.hlen(lanes.base() + "held:" + HOST) == 1
    redis.zadd(lanes.base() + "hosts", {HOST: 0})  # the pool died
    assert lanes.wake() == 0
    assert redis.lrange(lanes.base() + "ready:" + URL, 0, -1) == [i.encode() for i in items]
    assert redis.hget(lanes.base() + "inflight", URL) is None
    # Its late end changes nothing: what it held is the lane's again.
    assert lanes.claim(HOST, queue.new_id(), held) is None


def test_a_dead_pool_s_probe_is_made_again(redis):
    lanes.push({URL: (False, event_items(3))})
    redis.hset(lanes.base() + "state:" + URL, mapping={"mode": "open", "until": 0})
    probe = claim().claim
    assert probe is not None and probe.probe
    redis.zadd(lanes.base() + "hosts", {HOST: 0})
    assert lanes.wake() == 0
    lanes.renew(HOST)
    again = claim().claim
    assert again is not None and again.probe and again.items == probe.items


def test_a_url_failing_for_disable_after_is_disabled_and_its_events_dead_lettered(
    monkeypatch, redis, db
):
    patch_toot(monkeypatch, DISABLE_AFTER=0.001)
    lanes.push({URL: (False, event_items(lanes.SINGLE_PER_CLAIM + 3))})
    claimed = claim().claim
    assert claimed is not None
    redis.hset(lanes.base() + "state:" + URL, "since", 0)  # failing for ages
    assert end(fail(claimed)) == lanes.DISABLED
    lanes.push({URL: (False, event_items(2))})  # published while it is disabled
    assert claim().claim is None
    sending.relay_step(None)  # type: ignore[arg-type]  # starts no drain: nothing is due
    letters = DeadLetter.objects.filter(callback_url=URL)
    # What waited, and what came since; what the claim held send_claim would have retried.
    assert letters.count() == 3 + 2
    assert "disabled" in letters.first().last_error
    [status] = lanes.status([URL])
    assert status.mode == "disabled" and status.waiting == 0


def test_enable_closes_the_circuit_and_lets_the_lane_flow(redis):
    lanes.push({URL: (False, event_items(3))})
    lanes.disable(URL)
    assert claim().claim is None
    assert lanes.enable(URL) is True
    assert claim().claim is not None
    assert lanes.enable(URL) is False  # it was not disabled


def test_pending_counts_waiting_held_and_delayed():
    lanes.push({URL: (False, event_items(lanes.SINGLE_PER_CLAIM + 3))})
    claimed = claim().claim
    assert claimed is not None
    assert lanes.pending() == lanes.SINGLE_PER_CLAIM + 3
    claimed.retries = [({"delivery": {"url": URL}}, 60.0)]
    claim(claimed, take=False)
    assert lanes.pending() == 3 + 1


def test_toot_callbacks_lists_enables_and_disables():
    lanes.push({URL: (False, event_items(3))})
    out = StringIO()
    call_command("toot_callbacks", stdout=out)
    assert out.getvalue().splitlines() == [
        URL,
        "  circuit closed, 3 waiting, 0 in flight, 0 failures in a row, failing since -, "
        "open until -, rate limit -",
    ]
    call_command("toot_callbacks", URL, "--disable", stdout=out)
    assert lanes.status([URL])[0].mode == "disabled"
    call_command("toot_callbacks", URL, "--enable", stdout=out)
    assert lanes.status([URL])[0].mode == "closed"
    assert "Disabled " + URL in out.getvalue() and "Enabled " + URL in out.getvalue()
    with pytest.raises(CommandError, match="Name the callback URLs"):
        call_command("toot_callbacks", "--enable")


def test_toot_callbacks_says_when_there_is_nothing_to_show():
    out = StringIO()
    call_command("toot_callbacks", stdout=out)
    assert out.getvalue() == "No callback URL has deliveries waiting or a circuit open.\n"


STATUS_LINE = re.compile(
    r"  circuit (closed|open|probing|disabled), \d+ waiting, \d+ in flight, \d+ failures in a "
    r"row, failing since \S+, open until \S+, rate limit \S+"
)


def test_the_architecture_page_shows_toot_callbacks_as_it_prints():
    page = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    shown = page.split("$ python manage.py toot_callbacks\n", 1)[1].split("```", 1)[0]
    url, line = shown.splitlines()
    assert url.startswith("https://") and STATUS_LINE.fullmatch(line)
    lanes.push({URL: (False, event_items(1))})
    redis_state = lanes.base() + "state:" + URL
    get_redis().hset(redis_state, mapping={"mode": "open", "failures": 5, "since": 1, "until": 2})
    out = StringIO()
    call_command("toot_callbacks", stdout=out)
    assert STATUS_LINE.fullmatch(out.getvalue().splitlines()[1])
    assert (
        "failing since 1970-01-01T00:00:01+00:00, open until 1970-01-01T00:00:02" in out.getvalue()
    )


# Retries: a sorted set per URL, hurried once the URL answers again, or by retry_now.


def next_due(url: str = URL) -> float:
    due = lanes.retries()[url].next_due
    assert due is not None
    return due


def lane_retry(n: int, url: str = URL, channel: str = "org.example.lanes.v1") -> dict[str, Any]:
    return retry_item(url, channel, n)


def schedule(count: int, delay: float = 300.0, url: str = URL, **kwargs) -> None:
    """Retries of ``count`` deliveries to ``url``, due in ``delay`` seconds."""
    lanes.push({url: (False, event_items(1))})
    claimed = claim().claim
    assert claimed is not None and claimed.url == url
    claimed.outcome = lanes.FAILED
    claimed.retries = [(lane_retry(n, url, **kwargs), delay) for n in range(count)]
    claim(claimed, take=False)


def test_a_url_s_retries_wait_in_its_own_set_indexed_by_the_first_due(redis):
    schedule(3, delay=300.0)
    found = lanes.retries()
    assert list(found) == [URL] and found[URL].count == 3
    now = float(redis.time()[0])
    assert 290 < next_due() - now <= 301
    assert lanes.retrying_urls() == [URL]
    assert lanes.pending() == 3
    assert claim().claim is None  # none is due


def test_due_retries_come_into_the_lane_and_the_index_follows(redis):
    schedule(1, delay=300.0)
    schedule(2, delay=0.0)  # made ready as they are scheduled
    claimed = claim().claim
    assert claimed is not None and len(claimed.items) == 2
    assert lanes.retries()[URL].count == 1
    assert redis.zscore(lanes.base() + "delayed", URL) > float(redis.time()[0]) + 200


def test_a_url_that_answers_again_has_its_retries_hurried_a_step_at_a_time(redis, monkeypatch):
    monkeypatch.setattr(lanes, "RETRY_STEP", 100)
    schedule(250, delay=3600.0)  # its claim failed: one failure in a row
    lanes.push({URL: (False, event_items(1))})
    claimed = claim().claim
    assert claimed is not None
    claimed.outcome = lanes.OK
    claim(claimed, take=False)  # answered: every retry is due, and comes a step at a time
    assert redis.llen(lanes.base() + "ready:" + URL) == 100
    assert lanes.retries()[URL].count == 150
    assert next_due() <= float(redis.time()[0]) + 1  # hurried
    claim(take=False)
    assert redis.llen(lanes.base() + "ready:" + URL) == 100  # the lane is full: it waits
    redis.ltrim(lanes.base() + "ready:" + URL, 100, -1)  # sent
    redis.zadd(lanes.base() + "delayed", {URL: 0})  # RETRY_PAUSE has passed
    lanes.wake()
    assert redis.llen(lanes.base() + "ready:" + URL) == 100
    redis.ltrim(lanes.base() + "ready:" + URL, 100, -1)
    lanes.wake()
    assert redis.llen(lanes.base() + "ready:" + URL) == 50
    assert lanes.retries() == {}
    assert not redis.sismember(lanes.base() + "hurry", URL)


def test_a_url_that_never_failed_keeps_its_retries_schedule(redis):
    schedule(2, delay=3600.0)
    redis.hdel(lanes.base() + "state:" + URL, "failures")  # as if it had answered since
    lanes.push({URL: (False, event_items(1))})
    claimed = claim().claim
    assert claimed is not None
    end(claimed)
    assert next_due() > float(redis.time()[0]) + 3000


def test_retry_now_hurries_the_urls_named_or_every_url(redis):
    other = URL + "/other"
    schedule(2, url=URL)
    schedule(3, url=other)
    assert lanes.retry_now([URL]) == 2
    now = float(redis.time()[0])
    assert next_due() <= now + 1
    assert next_due(other) > now + 200
    assert lanes.retry_now([URL + "/none"]) == 0
    assert lanes.retry_now() == 5
    lanes.wake()
    assert lanes.retries() == {}
    assert redis.llen(lanes.base() + "ready:" + other) == 3


def test_retry_channel_now_makes_that_channel_s_retries_due(redis):
    schedule(2, channel="org.example.a.v1")
    schedule(3, channel="org.example.b.v1")
    assert lanes.retry_channel_now("org.example.b.v1") == 3
    assert lanes.retry_channel_now("org.example.none.v1") == 0
    lanes.wake()
    assert lanes.retries()[URL].count == 2
    ready = [item.decode() for item in redis.lrange(lanes.base() + "ready:" + URL, 0, -1)]
    assert sum("org.example.b.v1" in item for item in ready) == 3


def test_a_channel_s_retries_made_due_come_into_the_lane_a_step_at_a_time(redis):
    schedule(250, delay=3600.0, channel="org.example.b.v1")
    ready = lanes.base() + "ready:" + URL
    assert lanes.retry_channel_now("org.example.b.v1") == 250
    lanes.wake()
    assert redis.llen(ready) == lanes.RETRY_STEP == 100
    lanes.wake()
    assert redis.llen(ready) == 100  # the lane is full: the rest wait for room
    assert next_due() > float(redis.time()[0])  # looked at again after RETRY_PAUSE
    redis.ltrim(ready, 100, -1)  # sent
    redis.zadd(lanes.base() + "delayed", {URL: 0})  # RETRY_PAUSE has passed
    lanes.wake()
    assert redis.llen(ready) == 100
    redis.ltrim(ready, 100, -1)
    lanes.wake()
    assert redis.llen(ready) == 50
    assert lanes.retries() == {}


def test_a_retry_scheduled_before_the_urls_own_sets_is_still_sent(redis):
    """One upgrade's worth: the retries of a toot that kept them all in ``delayed``."""
    old = queue.encode(lane_retry(1))
    later = queue.encode(lane_retry(2))
    now = float(redis.time()[0])
    redis.zadd(lanes.base() + "delayed", {old: 0, later: now + 3600})
    found = lanes.retries()
    assert found[""].count == 2 and found[""].next_due == 0
    assert lanes.retrying_urls() == []
    lanes.wake()
    assert redis.lrange(lanes.base() + "ready:" + URL, 0, -1) == [old.encode()]
    assert lanes.retry_now() == 1
    lanes.wake()
    assert redis.llen(lanes.base() + "ready:" + URL) == 2
    assert lanes.retries() == {}


def test_a_claim_records_the_url_s_health_and_the_minute_s_counts(redis):
    lanes.push({URL: (False, event_items(2))})
    claimed = claim().claim
    assert claimed is not None
    claimed.outcome, claimed.failed, claimed.failure = lanes.FAILED, 2, "status 503"
    claim(claimed, take=False)
    record = lanes.health([URL])[URL]
    assert record["error"] == "status 503" and "ok" not in record
    lanes.push({URL: (False, event_items(1))})
    claimed = claim().claim
    assert claimed is not None
    claimed.outcome, claimed.delivered = lanes.OK, 1
    claim(claimed, take=False)
    record = lanes.health([URL])[URL]
    assert float(record["ok"]) >= float(record["failed"])
    assert 0 < redis.ttl(lanes.base() + "health:" + URL) <= lanes.HEALTH_KEPT  # not forever
    current, minutes = lanes.minutes(2)
    assert len(minutes) == 2
    totals = {key: sum(m.get(key, 0) for m in minutes) for key in ("delivered", "failed")}
    assert totals == {"delivered": 1, "failed": 2}
    assert current == int(redis.time()[0]) // 60


def test_a_sender_thread_outlives_redis_dropping_as_it_renews_a_lease_that_ran_out(
    monkeypatch, caplog
):
    # Redis going between two round trips cannot be arranged with a real one: the claim
    # says the lease ran out (a long pause), and the renewal after it finds Redis gone.
    # Only this pool's calls are scripted: the worker's own senders share the module.
    from toot.publisher import senders

    caplog.set_level(logging.WARNING, logger="toot.publisher.senders")
    monkeypatch.setattr(senders, "ERROR_PAUSE", 0.01)
    sent = threading.Event()
    pool = senders.Senders(lambda claim, keep_alive: sent.set())
    work = lanes.Claim(id="c1", url="http://one.example/cb", items=["i1"])
    replies = iter([None, lanes.Reply(work, "", None)])
    renewals = iter([None, ConnectionError("Redis went away")])
    real = {name: getattr(lanes, name) for name in ("claim", "renew", "release")}

    def claim(host, *args, **kwargs):
        return next(replies, None) if host == pool.host else real["claim"](host, *args, **kwargs)

    def renew(host):
        if host != pool.host:
            return real["renew"](host)
        error = next(renewals, None)
        if error is not None:
            raise error

    def release(host):
        if host != pool.host:
            real["release"](host)

    for name, fake in [("claim", claim), ("renew", renew), ("release", release)]:
        monkeypatch.setattr(lanes, name, fake)

    with pool.hosting():
        assert sent.wait(5), "the thread ended when the renewal failed"

    assert "toot senders cannot reach Redis, will keep trying: Redis went away" in caplog.text
