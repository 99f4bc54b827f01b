"""The toot_register_subscriptions command, against a real toot publisher and a real HTTP peer."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings

import toot
from devtools.processes import free_port
from tests.http_server import HTTPServer, Reply
from tests.utils import callback_urls, sources
from toot.models import DeadLetter
from toot.protocol.events import Event
from toot.publisher import store
from toot.publisher.delivery import Outcome
from toot.publisher.sending import bury_delivery
from toot.subscriber.handling import bury_handler, handler_name

pytestmark = pytest.mark.django_db(transaction=True)

CALLBACK_URL = settings.TOOT["CALLBACK_URL"]
PREFIX = settings.TOOT["SOURCES"]["publisher"]["CHANNEL_PREFIX"]
USERS = PREFIX + "users.updated.v1"
ORDERS = PREFIX + "orders.created.v1"


def on_user(event):
    pass


def on_order(event):
    pass


def register(*args):
    out = StringIO()
    call_command("toot_register_subscriptions", *args, stdout=out, stderr=StringIO(), no_color=True)
    return out.getvalue().splitlines()


@pytest.fixture
def publisher(live_server, redis):
    """The "publisher" source at a real toot publisher, storing into the tests' Redis."""
    url = f"{live_server.url}/toot/subscriptions"
    with sources(publisher=url):
        yield url


@pytest.fixture
def peer():
    with HTTPServer(Reply(201)) as server:
        yield server


def test_prints_created(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    assert register() == [f"publisher: {USERS} -> {publisher}: created"]
    assert callback_urls(USERS) == [CALLBACK_URL]


def test_prints_already_registered(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    register()

    assert register() == [f"publisher: {USERS} -> {publisher}: already registered"]


def test_one_line_per_source_and_channel(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.subscribe("publisher", "users.updated.v1", on_order)
    toot.subscribe("publisher", "orders.created.v1", on_order)
    store.add(ORDERS, CALLBACK_URL)

    lines = register()

    assert sorted(lines) == [
        f"publisher: {ORDERS} -> {publisher}: already registered",
        f"publisher: {USERS} -> {publisher}: created",
    ]
    assert store.subscriptions(PREFIX) == {ORDERS: [CALLBACK_URL], USERS: [CALLBACK_URL]}


def test_failure_prints_the_status_and_exits_non_zero(live_server, redis):
    nowhere = f"{live_server.url}/toot/nowhere"
    toot.subscribe("publisher", "users.updated.v1", on_user)
    out = StringIO()

    with sources(publisher=nowhere), pytest.raises(CommandError, match="could not be registered"):
        call_command("toot_register_subscriptions", stdout=out, no_color=True)

    [line] = out.getvalue().splitlines()
    assert line.startswith(f"publisher: {USERS} -> {nowhere}: failed (the source answered 404")


def test_failure_does_not_stop_the_others(live_server, redis, peer):
    peer.reply = Reply(503)
    subscriptions = f"{live_server.url}/toot/subscriptions"
    closed = f"http://127.0.0.1:{free_port()}/toot/subscriptions"
    with sources(first=f"{peer.url}/toot/subscriptions", second=closed, publisher=subscriptions):
        toot.subscribe("first", "users.updated.v1", on_user)
        toot.subscribe("second", "users.updated.v1", on_user)
        toot.subscribe("publisher", "users.updated.v1", on_user)
        out = StringIO()

        with pytest.raises(CommandError):
            call_command("toot_register_subscriptions", stdout=out, no_color=True)

    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = sorted(lines)
    assert first.startswith("first: org.example.first.users.updated.v1 -> ")
    assert "failed (the source answered 503" in first
    assert second.startswith(f"publisher: {USERS} -> {subscriptions}: created")
    assert third.startswith(f"second: org.example.second.users.updated.v1 -> {closed}: failed (")
    assert callback_urls(USERS) == [CALLBACK_URL]


def test_dry_run_lists_and_sends_nothing(peer):
    url = f"{peer.url}/toot/subscriptions"
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.subscribe("publisher", "orders.created.v1", on_order)

    with sources(publisher=url):
        lines = register("--dry-run")

    assert peer.requests == []
    assert len(lines) == 2
    for line, channel in zip(sorted(lines), [ORDERS, USERS], strict=True):
        where, body = line.split(": would POST ")
        assert where == f"publisher: {channel} -> {url}"
        assert json.loads(body) == {"callback_url": CALLBACK_URL, "channel": channel, "batch": True}


def test_dry_run_shows_a_body_without_batch_when_batches_are_off(peer):
    url = f"{peer.url}/toot/subscriptions"
    toot.subscribe("publisher", "users.updated.v1", on_user)

    with sources({"BATCH": False}, publisher=url):
        [line] = register("--dry-run")

    assert peer.requests == []
    assert json.loads(line.split(": would POST ")[1]) == {
        "callback_url": CALLBACK_URL,
        "channel": USERS,
    }


def test_dry_run_does_not_touch_a_real_publisher(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    [line] = register("--dry-run")

    assert "would POST" in line
    assert callback_urls(USERS) == []


def test_no_subscriptions(peer):
    with sources(publisher=peer.url):
        assert register() == ["No subscriptions to register."]
        assert register("--dry-run") == ["No subscriptions to register."]

    assert peer.requests == []


def test_missing_callback_url_is_a_command_error(peer):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    options = {
        **settings.TOOT,
        "SOURCES": {"publisher": {"SUBSCRIPTION_URL": peer.url, "CHANNEL_PREFIX": PREFIX}},
    }
    del options["CALLBACK_URL"]

    with (
        override_settings(TOOT=options),
        pytest.raises(CommandError, match=r'TOOT\["CALLBACK_URL"\]'),
    ):
        register()

    assert peer.requests == []


def test_help(capsys):
    with pytest.raises(SystemExit):
        call_command("toot_register_subscriptions", "--help")

    out = capsys.readouterr().out
    assert "Register this app's toot subscriptions" in out
    assert "--dry-run" in out


# toot_redeliver


def dead_letter(callback_url, channel=USERS):
    event = Event(channel, {"id": 1}).to_dict()
    return bury_delivery(event, callback_url, 4, Outcome(status=500, error="down"), None)


def redeliver_command(*args):
    out = StringIO()
    call_command("toot_redeliver", *args, stdout=out, no_color=True)
    return out.getvalue().splitlines()


def remaining():
    return set(DeadLetter.objects.values_list("pk", flat=True))


def test_redeliver_by_ids(peer):
    first, second, third = (dead_letter(peer.url) for _ in range(3))

    lines = redeliver_command(str(first.pk), str(third.pk))

    assert lines == [
        f"[1/2] {first.event_id} on {USERS} -> {peer.url}: delivered",
        f"[2/2] {third.event_id} on {USERS} -> {peer.url}: delivered",
        "2 of 2 redelivered.",
    ]
    assert remaining() == {second.pk}
    assert [r.json()["id"] for r in peer.requests] == [first.event_id, third.event_id]


def test_redeliver_by_channel(peer):
    users, orders = dead_letter(peer.url), dead_letter(peer.url, channel=ORDERS)

    lines = redeliver_command("--channel", ORDERS)

    assert lines == [
        f"[1/1] {orders.event_id} on {ORDERS} -> {peer.url}: delivered",
        "1 of 1 redelivered.",
    ]
    assert remaining() == {users.pk}


def test_redeliver_by_callback_url(peer):
    with HTTPServer() as other:
        mine, theirs = dead_letter(peer.url), dead_letter(other.url)

        lines = redeliver_command("--callback-url", other.url)

        assert other.requests and not peer.requests
    assert lines[-1] == "1 of 1 redelivered."
    assert lines[0].startswith(f"[1/1] {theirs.event_id} on {USERS} -> {other.url}")
    assert remaining() == {mine.pk}


def test_redeliver_all_including_handlers(peer, redis):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    delivery = dead_letter(peer.url)
    handler = bury_handler(
        Event(USERS, {}).to_dict(), handler_name(on_user), 2, RuntimeError("x"), None
    )

    lines = redeliver_command("--all")

    assert lines == [  # in the order they were buried
        f"[1/2] {delivery.event_id} on {USERS} -> {peer.url}: delivered",
        f"[2/2] {handler.event_id} on {USERS} -> {handler.handler}: handled",
        "2 of 2 redelivered.",
    ]
    assert remaining() == set()


def test_selectors_narrow_each_other(peer):
    users, orders = dead_letter(peer.url), dead_letter(peer.url, channel=ORDERS)

    assert redeliver_command(str(users.pk), "--channel", ORDERS) == ["0 of 0 redelivered."]
    assert remaining() == {users.pk, orders.pk}
    assert peer.requests == []


def test_redeliver_without_a_selector_is_a_command_error(peer):
    letter = dead_letter(peer.url)

    with pytest.raises(CommandError, match="ids, --channel, --callback-url or --all"):
        redeliver_command()

    assert remaining() == {letter.pk}
    assert peer.requests == []


def test_letters_that_fail_again_are_kept_and_the_command_fails(peer):
    with HTTPServer(Reply(503, body=b"maintenance")) as down:
        failing = dead_letter(down.url)
        delivered = dead_letter(peer.url)
        closed = dead_letter(f"http://127.0.0.1:{free_port()}/")
        out = StringIO()

        with pytest.raises(CommandError, match="2 dead letters failed again and were kept"):
            call_command("toot_redeliver", "--all", stdout=out, no_color=True)

    first, second, third, summary = out.getvalue().splitlines()
    assert first == f"[1/3] {failing.event_id} on {USERS} -> {down.url}: failed again (503)"
    assert second == f"[2/3] {delivered.event_id} on {USERS} -> {peer.url}: delivered"
    assert third.startswith(f"[3/3] {closed.event_id} on {USERS} -> {closed.callback_url}: ")
    assert "failed again (ConnectionError: " in third
    assert "Connection refused" in third
    assert summary == "1 of 3 redelivered."
    assert remaining() == {failing.pk, closed.pk}
    failing.refresh_from_db()
    assert (failing.attempts, failing.last_status, failing.last_error) == (5, 503, "maintenance")


def test_a_gone_subscriber_is_counted_apart_from_the_delivered(peer, redis):
    """A 410 removes the letter, as a delivery would, but the event reached nobody."""
    with HTTPServer(Reply(410)) as gone:
        store.add(USERS, gone.url)
        removed, delivered = dead_letter(gone.url), dead_letter(peer.url)

        lines = redeliver_command("--all")

        assert len(gone.requests) == 1
    assert lines == [
        f"[1/2] {removed.event_id} on {USERS} -> {gone.url}: "
        "gone (410): not delivered, subscription and letter removed",
        f"[2/2] {delivered.event_id} on {USERS} -> {peer.url}: delivered",
        "1 of 2 redelivered; 1 gone (410), removed undelivered.",
    ]
    assert remaining() == set()
    assert callback_urls(USERS) == []


def test_redeliver_unknown_ids_is_a_command_error(peer):
    letter = dead_letter(peer.url)
    missing = letter.pk + 1

    with pytest.raises(CommandError) as error:
        redeliver_command(str(missing + 7), str(letter.pk), str(missing), str(missing))

    assert (
        str(error.value) == f"No such dead letters: {missing}, {missing + 7}; nothing redelivered."
    )
    assert remaining() == {letter.pk}
    assert peer.requests == []


def test_redeliver_help(capsys):
    with pytest.raises(SystemExit):
        call_command("toot_redeliver", "--help")

    out = capsys.readouterr().out
    assert "Replay dead letters now" in out
    for option in ("--channel", "--callback-url", "--all"):
        assert option in out


def test_an_invalid_channel_is_a_command_error(peer):
    toot.subscribe("publisher", "users.updated.v1", on_user)
    source = {"SUBSCRIPTION_URL": peer.url, "CHANNEL_PREFIX": "org.example publisher."}

    with (
        override_settings(TOOT={**settings.TOOT, "SOURCES": {"publisher": source}}),
        pytest.raises(CommandError, match="printable ASCII"),
    ):
        register()

    assert peer.requests == []
