"""toot.status and its commands, toot_status and toot_retry_now, against the real Redis
and database; and what one status call costs with 100,000 retries and 10,000
subscriptions waiting.

Each test has a KEY_PREFIX of its own, so that it sees only its own queues and lanes.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from tests.utils import patch_toot, retry_item
from toot import status
from toot.engine import queue
from toot.engine.connection import get_redis
from toot.models import DeadLetter, OutboxEvent
from toot.protocol.events import Event, wire_json
from toot.publisher import lanes, store
from toot.publisher.delivery import Outcome
from toot.publisher.sending import bury_delivery
from toot.subscriber.handling import bury_handler

pytestmark = pytest.mark.django_db

URL = "http://127.0.0.1:9/callback"
OTHER = "http://127.0.0.1:9/other"
USERS = "org.example.users.updated.v1"
ORDERS = "org.example.orders.created.v1"
HOST = "test-pool"


@pytest.fixture(autouse=True)
def own_prefix(monkeypatch, redis, no_drain_at_work):
    """Queues and lanes of the test's own: the new KEY_PREFIX is every thread's, so no
    drain of the tests' worker may be at work."""
    patch_toot(monkeypatch, KEY_PREFIX=f"{settings.TOOT['KEY_PREFIX']}{uuid.uuid4().hex[:8]}:")
    lanes.renew(HOST)


def fail_once(url: str, retries: list[dict[str, Any]], delay: float = 300.0) -> None:
    """A claim of ``url`` that failed with a 503, leaving ``retries``."""
    lanes.push({url: (False, ["S" + wire_json(Event(USERS, {}).to_dict())])})
    claimed = lanes.claim(HOST, queue.new_id(), None)
    assert claimed is not None and claimed.claim is not None and claimed.claim.url == url
    ended = claimed.claim
    ended.outcome, ended.failure, ended.failed = lanes.FAILED, "status 503", 1
    ended.retries = [(item, delay) for item in retries]
    lanes.claim(HOST, queue.new_id(), ended, take=False)


def test_status_reports_both_sides():
    store.add(USERS, URL)
    store.add(ORDERS, URL, batch=True)
    store.add(USERS, OTHER)
    fail_once(URL, [retry_item(URL, USERS), retry_item(URL, ORDERS)])
    event = Event(USERS, {}).to_dict()
    bury_delivery(event, URL, 8, Outcome(status=500), None)
    bury_handler(event, "app.on_user", 8, ValueError("no"), None)
    OutboxEvent.objects.create(event=event)
    lane = f"{queue.IN}:app.on_user.{uuid.uuid4().hex[:8]}"  # registered whatever ran before
    queue.push_many({lane: [queue.encode({"event": event})]})
    queue.push(queue.OUT, [{"event": event}])

    found = status.status()

    pub = found.publisher
    assert pub.queue.ready == 1 and pub.queue.name == "out"
    assert (pub.retries, pub.outbox) == (2, 1)
    assert pub.next_retry is not None and pub.next_retry > found.at
    assert pub.dead_letters_by_channel == {USERS: 1}
    assert pub.dead_letters_by_url == {URL: 1}
    assert [(s.channel, s.callback_url, s.batch) for s in pub.subscriptions] == [
        (ORDERS, URL, True),
        (USERS, URL, False),
        (USERS, OTHER, False),
    ]
    [url, other] = pub.callbacks
    assert (other.url, other.channels, other.retries, other.last_failure) == (OTHER, 1, 0, None)
    assert (url.url, url.channels, url.retries, url.failures) == (URL, 2, 2, 1)
    assert url.last_error == "status 503" and url.last_failure is not None
    assert url.last_success is None and url.circuit == "closed"
    assert url.next_retry == pub.next_retry
    sub = found.subscriber
    assert [(q.name, q.ready) for q in sub.queues] == [("in", 0), (lane, 1)]
    assert sub.dead_letters_by_channel == {USERS: 1}
    assert sub.dead_letters_by_handler == {"app.on_user": 1}
    assert len(found.minutes) == 60
    assert sum(minute["failed"] for minute in found.minutes) == 1
    assert json.loads(found.as_json())["publisher"]["callbacks"][0]["retries"] == 2


def test_a_url_neither_subscribed_nor_sent_to_has_no_row():
    assert status.status(minutes=0).publisher.callbacks == []
    assert status.status(minutes=0).minutes == []


def test_toot_status_prints_a_table_and_json():
    store.add(USERS, URL)
    store.add(USERS, OTHER)
    fail_once(URL, [retry_item(URL, USERS)])
    DeadLetter.objects.all().delete()
    bury_handler(Event(USERS, {}).to_dict(), "app.on_user", 8, ValueError("no"), None)
    out = StringIO()
    call_command("toot_status", "--limit", "1", stdout=out, no_color=True)
    text = out.getvalue()
    assert "  retries waiting: 1, next due 20" in text
    assert "  dead letters by channel: none" in text
    assert "    ... and 1 more (--limit 0 for all)" in text
    assert "status 503" in text and "app.on_user" in text
    out = StringIO()
    call_command("toot_status", "--json", stdout=out)
    assert json.loads(out.getvalue())["publisher"]["retries"] == 1


def test_toot_retry_now_makes_retries_due(redis):
    fail_once(URL, [retry_item(URL, USERS), retry_item(URL, ORDERS)])
    fail_once(OTHER, [retry_item(OTHER, ORDERS)])
    handler_runs = [{"event": Event(channel, {}).to_dict()} for channel in (USERS, ORDERS)]
    drain_id = queue.push(queue.IN, handler_runs)  # its lease taken, no drain sent
    assert drain_id is not None
    items = queue.claim(queue.IN, drain_id, 10)
    queue.claim(queue.IN, drain_id, 0, [(item, 3600.0) for item in items])
    queue.forget(queue.IN, drain_id)

    def run(*args):
        out = StringIO()
        call_command("toot_retry_now", *args, stdout=out)
        return out.getvalue()

    assert run(OTHER) == "1 retries due now.\n"
    assert run("--channel", USERS) == "2 retries due now.\n"  # a delivery, a handler run
    assert queue.depth(queue.IN).retries == 2  # due or not, both wait for the relay
    # Both URLs' three again, and the other channel's handler run, not yet due till now.
    assert run("--all") == "4 retries due now.\n"
    due = queue.depth(queue.IN).next_due
    assert due is not None and due <= float(redis.time()[0]) + 1
    lanes.wake()
    assert lanes.retries() == {}
    with pytest.raises(CommandError, match="Say which retries"):
        run()


@pytest.mark.parametrize("urls", [1000, 10_000])
def test_one_status_call_with_100k_retries_and_10k_subscriptions_is_cheap(redis, urls, capsys):
    """10,000 subscriptions of ``urls`` URLs to 10,000 / ``urls`` channels each, and
    100,000 retries spread over the URLs: one call reads no retry and scans no key."""
    b = lanes.base()
    client = get_redis()
    item = json.dumps(retry_item(URL, USERS))
    with client.pipeline(transaction=False) as pipe:
        for n in range(10_000):
            url, channel = f"http://sub{n % urls}.example/cb", f"org.example.c{n // urls}.v1"
            store_keys = (store._channel_key(channel), store._index_key())
            pipe.sadd(store_keys[0], url)
            pipe.sadd(store_keys[1], channel)
        pipe.execute()
        now = float(client.time()[0])
        for n in range(urls):
            url = f"http://sub{n}.example/cb"
            per_url = 100_000 // urls
            members = {f"{n}-{i}-{item}": now + 60 + i for i in range(per_url)}
            pipe.zadd(b + "delayed:" + url, members)
            pipe.zadd(b + "delayed", {url: now + 60})
            pipe.hset(b + "health:" + url, mapping={"ok": now, "failed": now - 1, "error": "x"})
        pipe.execute()
    started = time.perf_counter()
    found = status.status()
    took = time.perf_counter() - started
    assert found.publisher.retries == 100_000
    assert len(found.publisher.subscriptions) == 10_000
    assert len(found.publisher.callbacks) == urls
    with capsys.disabled():
        print(
            f"\n  status(): {took * 1000:.0f} ms with 100,000 retries, 10,000 subscriptions "
            f"of {urls} URLs"
        )
    assert took < 5.0


def shape(text: str) -> list[str]:
    """The lines of a status as the operations page shows them, with times, URLs, channels,
    errors and numbers left out, and tables' rows but their headers."""
    shaped = []
    for line in text.splitlines():
        if line.startswith("    ") and line.split()[0] not in ("channel", "callback", "queue"):
            continue
        line = re.sub(r"\d{4}-\d\d-\d\dT[\d:]+\+00:00", "T", line)
        shaped.append(re.sub(r"\d+", "N", " ".join(line.split())))
    return shaped


def test_the_operations_page_shows_toot_status_as_it_prints():
    page = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    shown = page.split("server down for a few seconds):\n\n```console\n")[1]
    shown = shown.split("```", 1)[0].split("\n", 1)[1]  # past the command
    store.add(USERS, URL, batch=True)
    store.add(ORDERS, URL, batch=True)
    fail_once(URL, [retry_item(URL, USERS)])
    out = StringIO()
    call_command("toot_status", stdout=out, no_color=True)
    assert shape(out.getvalue()) == shape(shown)
