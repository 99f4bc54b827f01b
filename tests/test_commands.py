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
from toot import store

pytestmark = pytest.mark.django_db(transaction=True)

CALLBACK_URL = settings.TOOT["CALLBACK_URL"]
PREFIX = settings.TOOT["SOURCES"]["publisher"]["CHANNEL_PREFIX"]
USERS = PREFIX + "users.updated.v1"
ORDERS = PREFIX + "orders.created.v1"


def sources(**urls):
    """The tests' settings with a source per keyword, named so, at that subscription URL."""
    return override_settings(
        TOOT={
            **settings.TOOT,
            "SOURCES": {
                name: {"SUBSCRIPTION_URL": url, "CHANNEL_PREFIX": f"org.example.{name}."}
                for name, url in urls.items()
            },
        }
    )


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
    assert store.callback_urls(USERS) == [CALLBACK_URL]


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
    assert line.startswith(f"publisher: {USERS} -> {nowhere}: failed (")
    assert "status 404" in line


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
    assert "failed (" in first
    assert "status 503" in first
    assert second.startswith(f"publisher: {USERS} -> {subscriptions}: created")
    assert third.startswith(f"second: org.example.second.users.updated.v1 -> {closed}: failed (")
    assert store.callback_urls(USERS) == [CALLBACK_URL]


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
        assert json.loads(body) == {"callback_url": CALLBACK_URL, "channel": channel}


def test_dry_run_does_not_touch_a_real_publisher(publisher):
    toot.subscribe("publisher", "users.updated.v1", on_user)

    [line] = register("--dry-run")

    assert "would POST" in line
    assert store.callback_urls(USERS) == []


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
