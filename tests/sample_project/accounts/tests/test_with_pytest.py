"""The accounts app tested with pytest and toot's fixtures (toot_isolated, toot_published)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache

import toot
from accounts import services


@pytest.mark.django_db
def test_signing_up_announces_the_user(toot_isolated, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        user = services.sign_up("ada", newsletter=True)

    event = toot_isolated.assert_published(
        "users.signed_up.v1",
        # Compared as subscribers get it: the datetime as Django's JSON encoder writes it.
        contains={"id": user.pk, "username": "ada", "joined": user.date_joined},
    )
    assert event["newsletter"] is True


@pytest.mark.django_db
def test_a_signup_that_rolls_back_announces_nothing(
    toot_published, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(services.BotRefused):
        services.sign_up("bot-1")

    assert toot_published == []
    assert not User.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_the_signup_view_publishes_once_committed(client, toot_published):
    response = client.post("/signup", {"username": "grace"})

    assert response.status_code == 201
    [event] = toot_published
    assert event.channel == "org.example.accounts.users.signed_up.v1"
    assert event["id"] == response.json()["id"]


@pytest.mark.django_db(transaction=True)
def test_a_refused_signup_publishes_nothing(client, toot_isolated):
    response = client.post("/signup", {"username": "bot-2"})

    assert response.status_code == 400
    toot_isolated.assert_nothing_published()


def test_an_async_view_publishes_with_apublish(async_client, toot_isolated):
    from asgiref.sync import async_to_sync

    response = async_to_sync(async_client.post)(
        "/orders", {"sku": "T-1", "total": "12.30"}, content_type="application/json"
    )

    assert response.status_code == 202
    toot_isolated.assert_published("orders.placed.v1", {"sku": "T-1", "total": "12.30"})


def test_a_paid_invoice_is_counted_once_however_often_it_is_delivered(toot_isolated):
    cache.clear()
    event = toot_isolated.event("billing", "invoices.paid.v1", {"user": 7, "invoice": 42})

    first = toot_isolated.deliver_event(event)
    again = toot_isolated.deliver_event(event)  # the publisher retried

    assert first.ran == ["accounts.handlers.invoice_paid"]
    assert again.skipped == ["accounts.handlers.invoice_paid"]
    assert cache.get("paid-invoices:7") == 1


def test_an_async_handler_is_awaited(toot_isolated):
    toot_isolated.deliver("billing", "invoices.refunded.v1", {"invoice": 42, "amount": "9.99"})

    assert cache.get("refund:42") == "9.99"


def test_an_unsigned_delivery_is_refused(client, toot_isolated):
    event = toot_isolated.event("billing", "invoices.paid.v1", {"user": 7, "invoice": 43})

    signed = toot_isolated.post(client, event)
    forged = client.post("/toot/callbacks", event.to_json(), content_type="application/json")

    assert signed.status_code == 200
    assert forged.status_code == 401
    assert forged.json() == {
        "error": "signature required: missing webhook-id, "
        "webhook-timestamp, webhook-signature header"
    }


def test_a_test_that_forgets_the_helpers_is_stopped_before_reaching_redis():
    with pytest.raises(toot.NotIsolated, match="outside toot.testing's helpers"):
        toot.publish("users.signed_up.v1", {"id": 1})


def test_a_late_event_keeps_its_timestamp(toot_isolated):
    paid_at = dt.datetime(2026, 12, 6, 23, 0, tzinfo=dt.timezone.utc)
    delivery = toot_isolated.deliver(
        "billing", "invoices.paid.v1", {"user": 8, "invoice": 44}, timestamp=paid_at
    )

    assert delivery.event.timestamp == paid_at
