from __future__ import annotations

import pickle

import pytest
from django.core.exceptions import ImproperlyConfigured

import toot


@pytest.mark.parametrize(
    "error",
    [
        toot.CallbackFailure("https://sub.example/toot/callbacks", 503, "busy"),
        toot.CallbackFailure("https://sub.example/toot/callbacks", None),
        toot.RegisterSubscriptionFailure(
            "https://pub.example/toot/subscriptions", "a.b.v1", 422, "no"
        ),
    ],
    ids=["callback", "callback-no-status", "register"],
)
def test_failures_survive_pickling_with_their_fields(error):
    """Celery pickles a failed task's exception for its result backend."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_every_error_is_a_toot_error():
    assert issubclass(toot.ConfigError, ImproperlyConfigured)
    for name in ["ConfigError", "CallbackFailure", "RegisterSubscriptionFailure", "InvalidEvent"]:
        assert issubclass(getattr(toot, name), toot.TootError)
