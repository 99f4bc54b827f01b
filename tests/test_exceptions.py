from __future__ import annotations

import ast
import pickle
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

import toot
from toot import exceptions


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


def test_every_exception_toot_defines_lives_in_exceptions_under_toot_error():
    """None hides in the module that raises it, apart from the others."""
    package = Path(toot.__file__).parent
    defined = {
        (path.relative_to(package).as_posix(), node.name)
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(getattr(base, "id", "").endswith(("Error", "Exception")) for base in node.bases)
    }
    assert {path for path, _ in defined} == {"exceptions.py"}
    for _, name in defined:
        assert issubclass(getattr(exceptions, name), toot.TootError) or name == "TootError"
