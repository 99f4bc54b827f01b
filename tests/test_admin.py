"""toot's admin: dead letters (the redeliver action against real peers, through a real
worker), the outbox, and the pages of what lives in Redis, with their permissions."""

from __future__ import annotations

import json
import uuid

import pytest
from django.contrib import admin
from django.contrib.messages import constants, get_messages
from django.urls import include, path, reverse

from tests.http_server import HTTPServer, Reply
from tests.utils import relaying_lanes
from toot import admin as admin_module
from toot.engine import queue
from toot.models import DeadLetter, OutboxEvent
from toot.protocol.events import Event
from toot.publisher import lanes, store
from toot.publisher.delivery import Outcome
from toot.publisher.sending import bury_delivery
from toot.subscriber import handling
from toot.subscriber.handling import bury_handler
from toot.subscriber.registry import subscribe

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


def messages_of(response):
    return [(m.level, m.message) for m in get_messages(response.wsgi_request)]


@pytest.mark.django_db(transaction=True)  # the worker writes the dead letter meanwhile
def test_redeliver_selected_queues_the_work_for_a_worker(admin_client, celery_worker, eventually):
    """Nothing is sent in the admin's request: a worker sends each once, and one that fails
    again is a dead letter again, with one more attempt."""
    with relaying_lanes(), HTTPServer(Reply(204)) as up, HTTPServer(Reply(503)) as down:
        delivered, failed = delivery_letter(up.url), delivery_letter(down.url)
        untouched = delivery_letter(up.url)

        response = admin_client.post(
            reverse(CHANGELIST),
            {"action": "redeliver_selected", "_selected_action": [delivered.pk, failed.pk]},
            follow=True,
        )

        assert messages_of(response) == [
            (
                constants.SUCCESS,
                "2 queued to be redelivered by a worker; one that fails again is a dead "
                "letter again.",
            )
        ]
        eventually(lambda: len(up.requests) == 1 and len(down.requests) == 1)
        eventually(lambda: DeadLetter.objects.count() == 2, what="the failure dead-lettered")
    assert [r.json()["id"] for r in up.requests] == [delivered.event_id]
    again = DeadLetter.objects.exclude(pk=untouched.pk).get()
    assert (again.event_id, again.attempts, again.last_status) == (failed.event_id, 5, 503)


ran: list[str] = []


def on_update(event):
    ran.append(event.id)


@pytest.mark.django_db(transaction=True)  # the worker reads the database meanwhile
def test_redeliver_selected_queues_a_handler_run_on_its_lane(
    admin_client, celery_worker, eventually
):
    subscribe("publisher", "users.updated.v1", on_update)
    event = Event(SUBSCRIBED, {"id": 1}).to_dict()
    letter = bury_handler(event, handling.handler_name(on_update), 4, RuntimeError("boom"), None)
    ran.clear()

    admin_client.post(
        reverse(CHANGELIST), {"action": "redeliver_selected", "_selected_action": [letter.pk]}
    )

    assert not DeadLetter.objects.exists()
    eventually(lambda: ran == [event["id"]], what="the handler to run in the worker")


def test_redeliver_needs_the_change_permission(staff_client, django_user_model):
    client = staff_client
    letter = delivery_letter("http://peer.example/cb")
    client.force_login(staff(django_user_model, "view_deadletter"))

    response = client.post(
        reverse(CHANGELIST), {"action": "redeliver_selected", "_selected_action": [letter.pk]}
    )

    assert response.status_code == 200  # the changelist again: no such action for them
    assert DeadLetter.objects.filter(pk=letter.pk).exists()


# The outbox, and the pages of what lives in Redis


@pytest.fixture
def staff_client():
    """A client as the admin's staff use it: the CSRF token is the browser's business
    (test_an_action_needs_the_csrf_token checks it)."""
    from django.test import Client

    return Client()


def staff(django_user_model, *codenames):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user(f"staff-{uuid.uuid4().hex[:8]}", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


def test_the_outbox_is_read_only(admin_client):
    row = OutboxEvent.objects.create(event=Event(PUBLISHED, {}).to_dict())

    response = admin_client.get(reverse("admin:toot_outboxevent_changelist"))

    assert response.status_code == 200 and row.event["id"] in response.content.decode()
    assert admin_client.get(reverse("admin:toot_outboxevent_add")).status_code == 403
    change = admin_client.get(reverse("admin:toot_outboxevent_change", args=[row.pk]))
    assert not change.context["adminform"].form.fields


@pytest.fixture
def failing(redis):
    """A subscription whose URL failed, with a retry waiting an hour."""
    url = f"http://sub-{uuid.uuid4().hex[:8]}.example/cb"
    store.add(PUBLISHED, url, batch=True)
    event = Event(PUBLISHED, {"id": 1}).to_dict()
    record = {"url": url, "events": [event], "batch": False, "id": event["id"]}
    item = {"delivery": {**record, "attempts": 2, "first_attempt_at": None}}
    lanes.renew("admin-test")
    lanes.push({url: (False, ["S" + json.dumps(event)])})
    reply = lanes.claim("admin-test", queue.new_id(), None)
    assert reply is not None and reply.claim is not None
    ended = reply.claim
    ended.outcome, ended.failure, ended.retries = lanes.FAILED, "status 503", [(item, 3600.0)]
    lanes.claim("admin-test", queue.new_id(), ended, take=False)
    yield url, event
    store.remove(PUBLISHED, url)


def test_the_subscriptions_page_lists_filters_and_removes(admin_client, failing):
    url, _ = failing
    page = reverse("admin:toot_subscription_changelist")

    response = admin_client.get(page, {"q": url[7:20]})

    assert response.status_code == 200
    content = response.content.decode()
    assert url in content and "status 503" in content and "Remove" in content
    assert admin_client.get(page, {"q": "no-such-url"}).context["count"] == 0
    assert admin_client.get(page, {"channel": PUBLISHED}).context["count"] >= 1

    response = admin_client.post(page, {"channel": PUBLISHED, "callback_url": url}, follow=True)

    assert messages_of(response) == [(constants.SUCCESS, f"{url} unsubscribed from {PUBLISHED}.")]
    assert url not in store.subscriptions().get(PUBLISHED, [])
    response = admin_client.post(page, {"channel": PUBLISHED, "callback_url": url}, follow=True)
    assert messages_of(response) == [
        (constants.WARNING, f"{url} was not subscribed to {PUBLISHED}.")
    ]


def test_the_retries_page_filters_and_retries_now(admin_client, failing, redis):
    url, event = failing
    page = reverse("admin:toot_retry_changelist")

    response = admin_client.get(page, {"url": url, "channel": PUBLISHED})

    assert response.status_code == 200
    assert [row.url for row in response.context["rows"]] == [url]
    assert [item["event_ids"] for item in response.context["items"]] == [event["id"]]

    response = admin_client.post(page + f"?url={url}", {"url": url}, follow=True)

    assert messages_of(response) == [
        (constants.SUCCESS, "1 retries due now; a worker sends them at each callback URL's pace.")
    ]
    due = lanes.retries([url])[url].next_due
    assert due is not None and due <= float(redis.time()[0]) + 1
    assert admin_client.post(page, {"channel": PUBLISHED}).status_code == 302
    assert admin_client.post(page, {"all": "1"}).status_code == 302


def test_the_overview_shows_queues_and_a_chart(admin_client, failing):
    url, _ = failing

    response = admin_client.get(reverse("admin:toot_overview_changelist"))

    content = response.content.decode()
    assert response.status_code == 200
    assert "<svg" in content and 'data-series="failed"' in content and url in content


@pytest.mark.parametrize(
    ("page", "data"),
    [
        ("subscription", {"channel": PUBLISHED, "callback_url": "http://x.example/cb"}),
        ("retry", {"all": "1"}),
        ("overview", {}),
    ],
)
def test_a_page_s_action_needs_its_permission(staff_client, django_user_model, page, data):
    client = staff_client
    client.force_login(staff(django_user_model, f"view_{page}"))
    url = reverse(f"admin:toot_{page}_changelist")

    assert client.get(url).status_code == 200
    assert client.post(url, data).status_code == 403


def test_a_page_needs_a_permission_to_be_seen(staff_client, django_user_model):
    client = staff_client
    client.force_login(staff(django_user_model))
    for page in ("subscription", "retry", "overview"):
        assert client.get(reverse(f"admin:toot_{page}_changelist")).status_code == 403


def test_an_action_needs_the_csrf_token(django_user_model):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(django_user_model.objects.create_superuser("csrf", "c@example.com", "x"))

    assert client.post(reverse("admin:toot_retry_changelist"), {"all": "1"}).status_code == 403


def test_the_chart_scales_to_the_busiest_minute():
    minutes = [{"delivered": n, "failed": 0, "handled": 2 * n} for n in range(3)]
    svg = admin_module.chart(minutes)
    assert svg.count("<polyline") == 3
    assert ">4<" in svg  # the top of the scale
    assert "handler runs: 6" in svg
