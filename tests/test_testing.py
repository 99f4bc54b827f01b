"""toot.testing, its pytest plugin and the guard of toot.engine.isolation.

Most tests here point toot's Redis at a port nobody serves and turn the suite's
ALLOW_REDIS_IN_TESTS off (``offline``), as a project's test settings would be: what
works there reached no Redis. The sample project of tests/sample_project runs as a user
runs it, in a process of its own, with no Redis at all.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import json
import os
import subprocess
import sys
import unittest
from decimal import Decimal

import pytest
from django.conf import settings
from django.core import mail
from django.db import transaction
from django.test import SimpleTestCase, override_settings

import toot
from devtools.processes import ROOT, free_port
from tests.utils import toot_settings
from toot import testing
from toot.engine import broker, connection, isolation, queue
from toot.engine import drain as tasks
from toot.exceptions import DeliveryRefused, NotIsolated
from toot.http import client as http_client
from toot.protocol.events import Event
from toot.subscriber.handling import InItem
from toot.subscriber.registry import subscribe
from toot.testing import isolated

# The suite's worker must not be mid-drain while the helpers refuse Redis to every thread.
pytestmark = pytest.mark.usefixtures("no_drain_at_work")

PREFIX = "org.example.test."
SOURCE_PREFIX = "org.example.publisher."
SECRET = "whsec_dG9vdC10ZXN0aW5nLXRlc3RzLXNpZ25pbmcta2V5LTAx"


@pytest.fixture
def closed_url():
    """A Redis URL, with a password, at a port nobody serves."""
    return f"redis://user:hunter2@127.0.0.1:{free_port()}/3"


@pytest.fixture
def offline(closed_url):
    """A project's test settings: its Redis (unreachable here) is not the tests' own."""
    with toot_settings(REDIS_URL=closed_url, ALLOW_REDIS_IN_TESTS=False):
        yield closed_url


def calls_of(label, calls):
    def handler(event):
        calls.append((label, event.id))

    handler.__qualname__ = label
    return handler


# The guard, outside the helpers --------------------------------------------------------


def test_a_test_that_reaches_redis_outside_the_helpers_is_stopped(offline):
    with pytest.raises(NotIsolated) as raised:
        toot.publish("users.updated.v1", {"id": 1})

    message = str(raised.value)
    assert f"Redis ({offline.replace('user:hunter2@', '')})" in message
    assert "hunter2" not in message
    assert "outside toot.testing's helpers" in message
    assert "toot_isolated" in message
    assert "TOOT['ALLOW_REDIS_IN_TESTS'] = True" in message


def test_the_guard_names_a_redis_connection_of_the_projects():
    with (
        toot_settings(REDIS_CONNECTION="tests.utils.unreachable_redis", ALLOW_REDIS_IN_TESTS=False),
        pytest.raises(NotIsolated, match=r"REDIS_CONNECTION'\] = 'tests.utils.unreachable_redis'"),
    ):
        connection.get_redis()


def test_the_guard_stops_a_test_that_reaches_the_broker():
    with toot_settings(ALLOW_REDIS_IN_TESTS=False), pytest.raises(NotIsolated) as raised:
        broker.send_now(tasks.drain, ("in", "no-such-drain"))

    assert f"the broker ({isolation.bare(settings.CELERY_BROKER_URL)})" in str(raised.value)


def test_the_guard_names_celerys_default_broker_when_the_project_sets_none():
    with override_settings(CELERY_BROKER_URL=None):
        assert isolation.where("the broker") == "Celery's default broker"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:secret@redis.internal:6379/0", "redis://redis.internal:6379/0"),
        ("rediss://user:secret@[::1]:6380/1", "rediss://[::1]:6380/1"),
        ("redis://redis.internal/2", "redis://redis.internal/2"),
        ("redis://user:secret@redis.internal:99999/0", "a URL that cannot be parsed"),
        ("user:secret@redis.internal", "a URL with credentials"),
        ("memory", "memory"),
        (
            "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2/toot/0?sentinel_password=sp",
            "redis+sentinel://10.0.0.1:26379,10.0.0.2/toot/0",
        ),
        (
            "rediss+cluster://app:pw@10.0.0.1:7000,10.0.0.2",
            "rediss+cluster://10.0.0.1:7000,10.0.0.2",
        ),
    ],
)
def test_the_guard_shows_urls_without_credentials(url, shown):
    assert isolation.bare(url) == shown


def test_outside_django_test_environment_nothing_is_guarded(offline, monkeypatch):
    monkeypatch.delattr(mail, "outbox")  # as setup_test_environment() had not run

    assert not isolation.in_test_environment()
    assert connection.get_redis() is not None  # a client, not yet connected


def test_tests_whose_redis_is_their_own_reach_it(redis):
    assert settings.TOOT["ALLOW_REDIS_IN_TESTS"] is True
    assert connection.get_redis().ping()


# While the helpers are active ----------------------------------------------------------


def test_while_isolated_nothing_reaches_redis_the_broker_or_the_network(redis):
    with isolated():  # even where the suite's own Redis is allowed
        for reach in (
            connection.get_redis,
            lambda: broker.send_now(tasks.drain, ("in", "no-such-drain")),
            lambda: http_client.post_to_callback("https://sub.example/cb", b"{}", {}),
            lambda: http_client.post_to_source("https://pub.example/subs", "{}", {}),
        ):
            with pytest.raises(NotIsolated, match="while toot.testing's helpers are active"):
                reach()
    assert connection.get_redis().ping()  # and once they are no longer active, it does


def test_publish_is_captured_as_subscribers_get_it(offline):
    with isolated() as toot_test:
        event = toot.publish("users.updated.v1", {"at": dt.date(2026, 12, 6), "n": 1})

    assert toot_test.published == [event]
    assert toot_test.published[0].payload == {"at": "2026-12-06", "n": 1}
    assert toot_test.published[0].channel == PREFIX + "users.updated.v1"


@pytest.mark.django_db(transaction=True)
def test_an_event_is_captured_when_its_transaction_commits_and_never_if_it_rolls_back(offline):
    with isolated() as toot_test:
        with transaction.atomic():
            kept = toot.publish("kept.v1")
            with pytest.raises(ZeroDivisionError), transaction.atomic():  # a savepoint
                toot.publish("undone.v1")
                1 / 0  # noqa: B018
            assert toot_test.published == []  # not before the commit
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            toot.publish("undone.v1")
            1 / 0  # noqa: B018

    assert toot_test.published == [kept]
    toot_test.assert_nothing_published("undone.v1")


@pytest.mark.django_db
def test_under_testcase_events_wait_for_capture_on_commit_callbacks(
    offline, django_capture_on_commit_callbacks
):
    with isolated() as toot_test:
        toot.publish("waiting.v1", {"n": 1})
        with django_capture_on_commit_callbacks(execute=True):
            sent = toot.publish("sent.v1", {"n": 2})

    assert toot_test.published == [sent]
    with pytest.raises(AssertionError) as raised:
        toot_test.assert_published("waiting.v1")
    assert str(raised.value) == (
        f'no event published on waiting.v1.\nPublished (1):\n  {PREFIX}sent.v1 {{"n": 2}}\n'
        "1 publish() call(s) on waiting.v1 are waiting for their transaction to commit, or "
        "were rolled back. Under django.test.TestCase the test's transaction never commits: "
        "publish inside self.captureOnCommitCallbacks(execute=True) (pytest-django: "
        "django_capture_on_commit_callbacks(execute=True))."
    )


def test_an_inner_isolation_captures_what_is_published_within_it(offline):
    with isolated() as outer:
        first = toot.publish("a.v1")
        with isolated() as inner:
            second = toot.publish("b.v1")
        third = toot.publish("c.v1")

    assert outer.published == [first, third]
    assert inner.published == [second]


def test_apublish_is_captured_too(offline):
    with isolated() as toot_test:
        event = asyncio.run(toot.apublish("orders.placed.v1", {"total": Decimal("9.90")}))

    toot_test.assert_published("orders.placed.v1", {"total": "9.90"})
    assert toot_test.published == [event]


# Assertions ----------------------------------------------------------------------------


@pytest.fixture
def published(offline):
    with isolated() as toot_test:
        toot.publish("users.updated.v1", {"id": 1, "price": Decimal("1.50")})
        toot.publish("users.updated.v1", {"id": 2, "price": Decimal("2.50")})
        toot.publish("users.deleted.v1", ["not", "an", "object"])
        yield toot_test


def test_events_filters_by_channel_suffix_or_full_channel(published):
    assert [e["id"] for e in published.events("users.updated.v1")] == [1, 2]
    assert published.events(PREFIX + "users.deleted.v1") == published.published[2:]
    assert len(published.events()) == 3


def test_clear_forgets_what_was_published(published):
    published.clear()

    assert published.published == []
    published.assert_nothing_published()


def test_assert_published_returns_the_first_event_that_matches(published):
    assert published.assert_published("users.updated.v1")["id"] == 1
    assert published.assert_published(PREFIX + "users.updated.v1", contains={"id": 2})["id"] == 2
    event = published.assert_published(
        "users.updated.v1", {"id": 2, "price": Decimal("2.50")}, keys=["price"], count=1
    )
    assert event["id"] == 2
    assert published.assert_published("users.updated.v1", contains={"price": "1.50"})["id"] == 1
    published.assert_published("users.deleted.v1", ["not", "an", "object"])


def test_assert_published_says_why_each_event_does_not_match(published):
    with pytest.raises(AssertionError) as raised:
        published.assert_published("users.updated.v1", contains={"id": 3}, keys=["price"])

    assert str(raised.value) == (
        'no event published on users.updated.v1 with a payload containing {"id": 3} with '
        "the keys 'price'.\nPublished (3):\n"
        f'  {PREFIX}users.updated.v1 {{"id": 1, "price": "1.50"}}: payload["id"] is 1, not 3\n'
        f'  {PREFIX}users.updated.v1 {{"id": 2, "price": "2.50"}}: payload["id"] is 2, not 3\n'
        f'  {PREFIX}users.deleted.v1 ["not", "an", "object"]: payload is not an object but '
        '["not", "an", "object"]'
    )


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"payload": {"id": 1}}, 'payload is {"id": 1, "price": "1.50"}'),
        ({"keys": ["name"]}, "payload has no key 'name'"),
        ({"contains": {"name": "x"}}, "payload has no key 'name'"),
    ],
)
def test_assert_published_names_the_first_difference(published, kwargs, why):
    with pytest.raises(AssertionError, match="no event published") as raised:
        published.assert_published("users.updated.v1", **kwargs)

    assert f'{PREFIX}users.updated.v1 {{"id": 1, "price": "1.50"}}: {why}' in str(raised.value)


def test_assert_published_with_a_count_says_how_many_matched(published):
    with pytest.raises(AssertionError) as raised:
        published.assert_published("users.updated.v1", count=1)

    assert str(raised.value) == (
        "expected 1 events published on users.updated.v1, found 2:\n"
        f'  {PREFIX}users.updated.v1 {{"id": 1, "price": "1.50"}}\n'
        f'  {PREFIX}users.updated.v1 {{"id": 2, "price": "2.50"}}'
    )


def test_assert_published_when_nothing_was(offline):
    with isolated() as toot_test, pytest.raises(AssertionError) as raised:
        toot_test.assert_published("users.updated.v1", {"id": 1})

    assert str(raised.value) == (
        'no event published on users.updated.v1 with the payload {"id": 1}.\nNothing was published.'
    )


def test_a_long_payload_is_shortened_in_messages(offline):
    with isolated() as toot_test:
        toot.publish("big.v1", {"text": "x" * 500})
        with pytest.raises(AssertionError) as raised:
            toot_test.assert_nothing_published()

    assert str(raised.value) == (
        f'expected no event published, found 1:\n  {PREFIX}big.v1 {{"text": "{"x" * 187}...'
    )


def test_assert_nothing_published_on_a_channel(published):
    published.assert_nothing_published("users.created.v1")
    with pytest.raises(AssertionError) as raised:
        published.assert_nothing_published("users.deleted.v1")

    assert str(raised.value) == (
        "expected no event published on users.deleted.v1, found 1:\n"
        f'  {PREFIX}users.deleted.v1 ["not", "an", "object"]'
    )


# Delivering ----------------------------------------------------------------------------


def test_deliver_runs_the_handlers_once_per_event(offline):
    calls: list[tuple[str, str]] = []
    subscribe("publisher", "users.updated.v1", calls_of("first", calls))
    subscribe("publisher", "users.updated.v1", calls_of("second", calls))
    subscribe("publisher", "users.deleted.v1", calls_of("elsewhere", calls))

    with isolated() as toot_test:
        first = toot_test.deliver("publisher", "users.updated.v1", {"id": 1}, id="event-1")
        again = toot_test.deliver_event(first.event.to_dict())

    assert calls == [("first", "event-1"), ("second", "event-1")]
    assert first.ran == ["tests.test_testing.first", "tests.test_testing.second"]
    assert first.skipped == []
    assert again.ran == []
    assert again.skipped == first.ran
    assert first.event.channel == SOURCE_PREFIX + "users.updated.v1"
    assert toot_test.handled == [(first.event, name) for name in first.ran]
    assert toot_test.skipped == [(first.event, name) for name in first.ran]


def test_a_handler_that_raises_raises_to_the_test_and_runs_again_when_redelivered(offline):
    calls: list[str] = []

    def flaky(event):
        calls.append(event.id)
        if len(calls) == 1:
            raise RuntimeError("first time")

    subscribe("publisher", "users.updated.v1", flaky)

    with isolated() as toot_test:
        event = toot_test.event("publisher", "users.updated.v1", {"id": 1})
        with pytest.raises(RuntimeError, match="first time"):
            toot_test.deliver_event(event)
        retried = toot_test.deliver_event(event)

    assert calls == [event.id, event.id]
    [name] = retried.ran
    assert name.endswith("<locals>.flaky")


def test_an_async_handler_is_awaited_when_delivered(offline):
    seen = []

    async def handler(event):
        await asyncio.sleep(0)
        seen.append(event["id"])

    subscribe("publisher", "users.updated.v1", handler)

    with isolated() as toot_test:
        toot_test.deliver("publisher", "users.updated.v1", {"id": 7})

    assert seen == [7]


def test_delivering_on_a_channel_nobody_here_handles_is_refused(offline):
    with isolated() as toot_test, pytest.raises(DeliveryRefused) as raised:
        toot_test.deliver("publisher", "users.updated.v1")

    assert raised.value.status == 200
    assert str(raised.value) == (
        "the callbacks endpoint answered 200: no handler here is subscribed to "
        f"{SOURCE_PREFIX}users.updated.v1 (X-Toot-Unsubscribe)"
    )
    assert isinstance(raised.value, AssertionError)


def test_an_invalid_event_is_refused_as_the_endpoint_refuses_it(offline):
    with isolated() as toot_test, pytest.raises(DeliveryRefused) as raised:
        toot_test.deliver_event({"id": "x", "payload": {}})

    assert (raised.value.status, raised.value.error) == (422, "channel is missing")


def test_a_source_with_a_secret_gets_signed_deliveries(offline, client):
    calls: list[tuple[str, str]] = []
    sources = {"publisher": {**settings.TOOT["SOURCES"]["publisher"], "SECRET": SECRET}}
    with toot_settings(SOURCES=sources), isolated() as toot_test:
        subscribe("publisher", "users.updated.v1", calls_of("signed", calls))
        event = toot_test.event("publisher", "users.updated.v1", {"id": 1})
        body, headers = toot_test.callback_request(event)
        forged = {**headers, "webhook-signature": "v1,Zm9yZ2Vk"}

        assert toot_test.deliver_event(event).ran == ["tests.test_testing.signed"]
        assert toot_test.post(client, event).status_code == 200  # done already: skipped
        refused = toot_test.post(client, event, headers=forged)
        unsigned = client.post("/toot/callbacks", body, content_type="application/json")

    assert sorted(headers) == ["webhook-id", "webhook-signature", "webhook-timestamp"]
    assert refused.status_code == 401
    assert refused.json() == {"error": "signature does not match"}
    assert unsigned.status_code == 401
    assert calls == [("signed", event.id)]
    assert toot_test.skipped == [(event, "tests.test_testing.signed")]


def test_a_test_clients_post_runs_the_handlers_in_the_test(offline, client):
    calls: list[tuple[str, str]] = []
    subscribe("publisher", "users.updated.v1", calls_of("posted", calls))

    with isolated() as toot_test:
        event = toot_test.event("publisher", "users.updated.v1", [1, 2])
        response = client.post("/toot/callbacks", event.to_json(), content_type="application/json")

    assert response.status_code == 200
    assert calls == [("posted", event.id)]


def test_an_unsigned_source_needs_no_signature_headers(offline):
    with isolated() as toot_test:
        body, headers = toot_test.callback_request({"channel": 5})

    assert json.loads(body) == {"channel": 5}
    assert headers == {}


def test_work_for_a_handler_gone_fails_as_in_a_drain(offline):
    calls: list[tuple[str, str]] = []
    subscribe("publisher", "users.updated.v1", calls_of("present", calls))
    event = Event(SOURCE_PREFIX + "users.updated.v1", {"id": 1})

    with isolated() as toot_test:
        toot_test.push({"in:all": [queue.encode(InItem(event=event.to_dict()))]})
        gone = InItem(event=event.to_dict(), handlers=["gone"])
        with pytest.raises(LookupError, match="gone is not subscribed to"):
            toot_test.push({"in:gone": [queue.encode(gone)]})

    assert calls == [("present", event.id)]


def test_an_error_body_that_is_not_json_is_quoted():
    assert testing._error_of(b"<h1>Bad Request</h1>") == "<h1>Bad Request</h1>"
    assert testing._error_of(b'["no error key"]') == '["no error key"]'


# The unittest mixin and the pytest plugin ----------------------------------------------


def test_the_mixin_isolates_each_test_of_a_test_case(offline):
    seen = []

    class Case(testing.TootIsolationMixin, SimpleTestCase):
        def test_publish(self):
            toot.publish("users.updated.v1", {"id": 1})
            self.toot.assert_published("users.updated.v1", {"id": 1})
            seen.append(self.toot)

    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(Case).run(result)

    assert result.wasSuccessful(), result.errors + result.failures
    assert len(seen) == 1
    assert isolation.stand_in() is None  # ended with the test


def test_the_plugins_fixtures(offline, toot_isolated, toot_published):
    event = toot.publish("users.updated.v1", {"id": 1})

    assert toot_published == [event]
    assert toot_isolated.published is toot_published
    assert isolation.stand_in() is toot_isolated


def test_the_plugin_is_an_entry_point_of_pytest():
    [entry] = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "toot"]
    assert entry.value == "toot.pytest_plugin"


# Projects tested with the helpers alone, in processes of their own -------------------


def projects_environment():
    """No Redis: toot's and Celery's URLs point at a port nobody serves."""
    closed = f"redis://127.0.0.1:{free_port()}/0"
    env = {
        key: value
        for key, value in os.environ.items()
        # and not the suite's database: each project tests on its own SQLite
        if not key.startswith(("TOOT_", "CELERY_", "DJANGO_", "PYTEST_", "DATABASE_URL"))
    }
    env.update(SAMPLE_REDIS_URL=closed, TOOT_REDIS_URL=closed, TOOT_LOG_LEVEL="WARNING")
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_the_sample_project_passes_with_no_redis():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"],
        cwd=ROOT / "tests" / "sample_project",
        env=projects_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


def test_the_example_projects_tests_pass_with_no_redis():
    result = subprocess.run(
        [sys.executable, "manage.py", "test", "example_app"],
        cwd=ROOT / "example_project",
        env={**projects_environment(), "DJANGO_SETTINGS_MODULE": "example_project.subscriber"},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stderr
