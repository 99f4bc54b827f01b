from __future__ import annotations

from typing import Any, cast

import pytest
from django.conf import settings
from django.test import override_settings

import toot
from toot.subscriber.registry import Subscription, registry

OTHER = {
    "SUBSCRIPTION_URL": "http://other.example/toot/subscriptions",
    "CHANNEL_PREFIX": "org.example.other.",
}


def with_other_source():
    return override_settings(
        TOOT={**settings.TOOT, "SOURCES": {**settings.TOOT["SOURCES"], "other": OTHER}}
    )


def on_user(event):
    pass


def on_order(event):
    pass


def test_subscribe_as_a_decorator_returns_the_function():
    def handler(event):
        pass

    decorated = toot.subscribe("publisher", "users.updated.v1")(handler)

    assert decorated is handler
    assert registry.subscriptions == (Subscription("publisher", "users.updated.v1", handler),)


def test_subscribe_decorator_syntax():
    @toot.subscribe("publisher", "users.updated.v1")
    def handler(event):
        """Handles users."""

    assert handler.__name__ == "handler"
    assert handler.__doc__ == "Handles users."
    assert registry.handlers_for("org.example.publisher.users.updated.v1") == [handler]


def test_subscribe_takes_the_celery_queue_of_the_handlers_drains_in_both_forms():
    toot.subscribe("publisher", "users.updated.v1", on_user, queue="slow")

    @toot.subscribe("publisher", "users.deleted.v1", queue="slower")
    def on_delete(event):
        pass

    assert [sub.queue for sub in registry.subscriptions] == ["slow", "slower"]


def test_a_handler_subscribed_again_with_another_queue_runs_once():
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.subscribe("publisher", "users.updated.v1", on_user, queue="slow")

    assert registry.handlers_for("org.example.publisher.users.updated.v1") == [on_user]


def test_subscribe_plain_form_returns_the_function():
    assert toot.subscribe("publisher", "users.updated.v1", on_user) is on_user
    assert registry.handlers_for("org.example.publisher.users.updated.v1") == [on_user]


def test_subscribe_accepts_any_callable():
    class Handler:
        def __call__(self, event):
            pass

    handler = Handler()
    toot.subscribe("publisher", "users.updated.v1", handler)

    assert registry.handlers_for("org.example.publisher.users.updated.v1") == [handler]


def test_undefined_source_raises_config_error_naming_it():
    with pytest.raises(toot.ConfigError, match='"nowhere"'):
        toot.subscribe("nowhere", "users.updated.v1", on_user)

    assert registry.subscriptions == ()


def test_undefined_source_raises_with_the_decorator_too():
    with pytest.raises(toot.ConfigError, match='"nowhere"'):
        toot.subscribe("nowhere", "users.updated.v1")(on_user)


@pytest.mark.parametrize("channel", ["users updated", "users.é.v1", "users\n", "x" * 300])
def test_invalid_channel_raises_invalid_channel(channel):
    with pytest.raises(toot.InvalidChannel):
        toot.subscribe("publisher", channel, on_user)

    assert registry.subscriptions == ()


def test_channel_length_counts_the_source_prefix():
    prefix = settings.TOOT["SOURCES"]["publisher"]["CHANNEL_PREFIX"]
    longest = "x" * (255 - len(prefix))

    toot.subscribe("publisher", longest, on_user)
    with pytest.raises(toot.InvalidChannel):
        toot.subscribe("publisher", longest + "x", on_order)

    assert registry.handlers_for(prefix + longest) == [on_user]


@pytest.mark.parametrize("handler", ["myapp.handlers.on_user", 42, object()])
def test_handler_must_be_callable(handler):
    with pytest.raises(TypeError, match="callable"):
        toot.subscribe("publisher", "users.updated.v1", handler)

    assert registry.subscriptions == ()


def test_decorating_a_non_callable_raises_type_error():
    with pytest.raises(TypeError):
        toot.subscribe("publisher", "users.updated.v1")(cast(Any, "not a function"))


def test_duplicate_subscription_is_registered_once():
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.subscribe("publisher", "users.updated.v1")(on_user)

    assert len(registry.subscriptions) == 1
    assert registry.handlers_for("org.example.publisher.users.updated.v1") == [on_user]


def test_handlers_match_the_full_channel():
    with with_other_source():
        toot.subscribe("publisher", "users.updated.v1", on_user)
        toot.subscribe("publisher", "orders.created.v1", on_order)
        toot.subscribe("other", "users.updated.v1", on_order)

        assert registry.handlers_for("org.example.publisher.users.updated.v1") == [on_user]
        assert registry.handlers_for("org.example.publisher.orders.created.v1") == [on_order]
        assert registry.handlers_for("org.example.other.users.updated.v1") == [on_order]
        assert registry.handlers_for("users.updated.v1") == []
        assert registry.handlers_for("org.example.publisher.users.updated.v2") == []
        assert registry.handlers_for("org.example.publisher.users.updated") == []
        assert registry.handlers_for("org.example.test.users.updated.v1") == []


def test_several_handlers_on_one_channel_in_subscription_order():
    toot.subscribe("publisher", "users.updated.v1", on_order)
    toot.subscribe("publisher", "users.updated.v1", on_user)

    assert registry.handlers_for("org.example.publisher.users.updated.v1") == [on_order, on_user]


def test_handlers_follow_the_source_prefix_in_the_settings():
    toot.subscribe("publisher", "users.updated.v1", on_user)
    moved = {**settings.TOOT["SOURCES"]["publisher"], "CHANNEL_PREFIX": "org.example.moved."}

    with override_settings(TOOT={**settings.TOOT, "SOURCES": {"publisher": moved}}):
        assert registry.handlers_for("org.example.moved.users.updated.v1") == [on_user]
        assert registry.handlers_for("org.example.publisher.users.updated.v1") == []


def test_subscription_to_a_vanished_source_matches_nothing():
    with with_other_source():
        toot.subscribe("other", "users.updated.v1", on_order)
    toot.subscribe("publisher", "users.updated.v1", on_user)

    assert registry.handlers_for("org.example.other.users.updated.v1") == []
    assert registry.handlers_for("org.example.publisher.users.updated.v1") == [on_user]
    assert len(registry.subscriptions) == 2  # kept; the check toot.E004 reports it


def test_full_channel():
    toot.subscribe("publisher", "users.updated.v1", on_user)

    [subscription] = registry.subscriptions
    assert subscription.full_channel == "org.example.publisher.users.updated.v1"


def test_reset_forgets_every_subscription():
    toot.subscribe("publisher", "users.updated.v1", on_user)
    toot.subscribe("publisher", "orders.created.v1", on_order)

    registry.reset()

    assert registry.subscriptions == ()
    assert registry.handlers_for("org.example.publisher.users.updated.v1") == []
