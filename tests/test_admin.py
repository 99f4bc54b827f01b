"""The dead letter admin: its changelist, filters, and the redeliver action against real peers."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.contrib.messages import constants, get_messages
from django.urls import include, path, reverse

from tests.http_server import HTTPServer, Reply
from toot.models import DeadLetter
from toot.protocol.events import Event
from toot.publisher.delivery import Outcome
from toot.publisher.sending import bury_delivery
from toot.subscriber.handling import bury_handler

# The tests' own URLconf has no admin; this module's does.
urlpatterns = [path("admin/", admin.site.urls), path("toot/", include("toot.urls"))]

pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]

CHANGELIST = "admin:toot_deadletter_changelist"
PUBLISHED = "org.example.test.users.updated.v1"
SUBSCRIBED = "org.example.publisher.users.updated.v1"


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    # admin_client's superuser is otherwise hashed with the real iterations: a second a test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def delivery_letter(callback_url, status=500):
    event = Event(PUBLISHED, {"id": 1}).to_dict()
    return bury_delivery(event, callback_url, 4, Outcome(status=status, error="down"), None)


def handler_letter():
    event = Event(SUBSCRIBED, {"id": 1}).to_dict()
    return bury_handler(event, "app.handlers.on_update", 4, RuntimeError("boom"), None)


def listed(response):
    return {letter.pk for letter in response.context["cl"].result_list}


def test_the_changelist_lists_every_dead_letter_with_its_filters(admin_client):
    delivery, handler = delivery_letter("http://peer.example/cb"), handler_letter()

    response = admin_client.get(reverse(CHANGELIST))

    assert response.status_code == 200
    assert listed(response) == {delivery.pk, handler.pk}
    filters = [spec.title for spec in response.context["cl"].filter_specs]
    assert filters == ["kind", "channel", "last status", "callback url"]
    content = response.content.decode()
    assert delivery.event_id in content
    assert handler.event_id in content
    assert "Redeliver selected dead letters" in content


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"kind__exact": "handler"}, "handler"),
        ({"kind__exact": "delivery"}, "delivery"),
        ({"channel": SUBSCRIBED}, "handler"),
        ({"last_status": "503"}, "delivery"),
        ({"callback_url": "http://peer.example/cb"}, "delivery"),
    ],
)
def test_the_filters_select_dead_letters(admin_client, query, expected):
    letters = {
        "delivery": delivery_letter("http://peer.example/cb", status=503),
        "handler": handler_letter(),
    }

    response = admin_client.get(reverse(CHANGELIST), query)

    assert response.status_code == 200
    assert listed(response) == {letters[expected].pk}


def test_search_finds_an_event_id(admin_client):
    wanted, _ = delivery_letter("http://peer.example/cb"), handler_letter()

    response = admin_client.get(reverse(CHANGELIST), {"q": wanted.event_id})

    assert listed(response) == {wanted.pk}


def test_a_dead_letter_shows_read_only(admin_client):
    letter = delivery_letter("http://peer.example/cb")

    response = admin_client.get(reverse("admin:toot_deadletter_change", args=[letter.pk]))

    assert response.status_code == 200
    assert letter.event_id in response.content.decode()
    assert not response.context["adminform"].form.fields  # every field is read-only


def test_a_dead_letter_cannot_be_added(admin_client):
    """Every field is read-only: an added letter would fail on its NOT NULL fields."""
    add = reverse("admin:toot_deadletter_add")

    assert admin_client.get(add).status_code == 403
    assert admin_client.post(add, {}).status_code == 403
    assert not admin_client.get(reverse(CHANGELIST)).context["has_add_permission"]
    assert not DeadLetter.objects.exists()


def test_the_changelist_needs_a_staff_user(client):
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 302
    assert reverse("admin:login") in response["Location"]


def test_redeliver_selected_reports_what_was_delivered_and_what_failed(admin_client):
    with HTTPServer(Reply(204)) as up, HTTPServer(Reply(503, body=b"still down")) as down:
        delivered, failed = delivery_letter(up.url), delivery_letter(down.url)
        untouched = delivery_letter(up.url)

        response = admin_client.post(
            reverse(CHANGELIST),
            {"action": "redeliver_selected", "_selected_action": [delivered.pk, failed.pk]},
            follow=True,
        )

        assert [r.json()["id"] for r in up.requests] == [delivered.event_id]
        assert [r.json()["id"] for r in down.requests] == [failed.event_id]
    assert response.status_code == 200
    messages = [(m.level, m.message) for m in get_messages(response.wsgi_request)]
    assert messages == [
        (constants.SUCCESS, "1 redelivered."),
        (constants.WARNING, "1 failed again; see their last error."),
    ]
    assert set(DeadLetter.objects.values_list("pk", flat=True)) == {failed.pk, untouched.pk}
    failed.refresh_from_db()
    assert (failed.attempts, failed.last_status, failed.last_error) == (5, 503, "still down")


def test_redeliver_selected_reports_a_gone_subscriber_apart(admin_client, redis):
    """A 410 removes the letter but delivers nothing: not among the redelivered."""
    with HTTPServer(Reply(410)) as gone, HTTPServer(Reply(204)) as up:
        letters = [delivery_letter(gone.url), delivery_letter(up.url)]

        response = admin_client.post(
            reverse(CHANGELIST),
            {"action": "redeliver_selected", "_selected_action": [letter.pk for letter in letters]},
            follow=True,
        )

        assert (len(gone.requests), len(up.requests)) == (1, 1)
    messages = [(m.level, m.message) for m in get_messages(response.wsgi_request)]
    assert messages == [
        (constants.SUCCESS, "1 redelivered."),
        (constants.WARNING, "1 gone (410), removed undelivered."),
    ]
    assert not DeadLetter.objects.exists()


def test_redeliver_selected_when_all_succeed_reports_no_failure(admin_client):
    with HTTPServer(Reply(200)) as up:
        letters = [delivery_letter(up.url) for _ in range(3)]

        response = admin_client.post(
            reverse(CHANGELIST),
            {"action": "redeliver_selected", "_selected_action": [letter.pk for letter in letters]},
            follow=True,
        )

        assert len(up.requests) == 3
    assert [m.message for m in get_messages(response.wsgi_request)] == ["3 redelivered."]
    assert not DeadLetter.objects.exists()


def test_redeliver_selected_when_all_fail_reports_only_the_failure(admin_client):
    with HTTPServer(Reply(500)) as down:
        letter = delivery_letter(down.url)

        response = admin_client.post(
            reverse(CHANGELIST),
            {"action": "redeliver_selected", "_selected_action": [letter.pk]},
            follow=True,
        )

    assert [m.message for m in get_messages(response.wsgi_request)] == [
        "1 failed again; see their last error."
    ]
    assert DeadLetter.objects.filter(pk=letter.pk).exists()
