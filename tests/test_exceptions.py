from __future__ import annotations

import pickle

from django.core.exceptions import ImproperlyConfigured

import toot


def test_registration_failure_survives_pickling_with_its_fields():
    """A project's own task may register subscriptions, and Celery pickles its exception."""
    error = toot.RegisterSubscriptionFailure(
        "https://pub.example/toot/subscriptions", "a.b.v1", 422, "no"
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_every_error_is_a_toot_error():
    assert issubclass(toot.ConfigError, ImproperlyConfigured)
    for name in ["ConfigError", "RegisterSubscriptionFailure", "InvalidEvent"]:
        assert issubclass(getattr(toot, name), toot.TootError)
