"""Where toot's work goes while ``toot.testing``'s helpers are active, and the guard that
keeps a test from reaching a Redis or broker that is not the tests' own.

While a stand-in (``toot.testing``'s) is active, ``drain.enqueue`` hands it what would be
pushed onto Redis, and every call that would reach Redis, the broker or a peer raises
NotIsolated instead. It is process-wide, as Django's ``mail.outbox`` is: a live server's
thread publishes into the same capture as the test's.

Outside the helpers, in Django's test environment (``setup_test_environment()``, which
``manage.py test`` and pytest-django set up), toot reaches Redis and the broker only when
``TOOT["ALLOW_REDIS_IN_TESTS"]`` says that they are the tests' own: a development worker
on the same Redis would otherwise take a test's events and run its handlers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import urlsplit

from django.core import mail

from toot.conf import conf
from toot.exceptions import NotIsolated


class StandIn(Protocol):
    """What takes toot's pushes instead of Redis (``toot.testing.Isolation``)."""

    def push(self, pushes: Mapping[str, Sequence[str]]) -> None:
        """Take the encoded items that would go onto each queue or lane."""

    def publishing(self, wire: dict[str, Any]) -> None:
        """``publish()`` was called with this event, which is sent once its
        transactions commit."""


_stand_ins: list[StandIn] = []
_lock = threading.Lock()


def stand_in() -> StandIn | None:
    """The innermost active stand-in, if any."""
    return _stand_ins[-1] if _stand_ins else None


@contextmanager
def standing_in(replacement: StandIn) -> Iterator[None]:
    with _lock:
        _stand_ins.append(replacement)
    try:
        yield
    finally:
        with _lock:
            _stand_ins.remove(replacement)


def in_test_environment() -> bool:
    """Whether Django's test environment is set up: it gives ``mail`` its outbox."""
    return hasattr(mail, "outbox")


HELPERS = (
    "toot.testing's helpers (pytest: the toot_isolated fixture; unittest: "
    "toot.testing.TootIsolationMixin; or `with toot.testing.isolated():`)"
)


def check(what: str, *, outside_helpers: bool = True) -> None:
    """Raise NotIsolated if toot must not reach ``what`` ("Redis", "the broker", "the
    network") now: never while the helpers are active and, with ``outside_helpers``, not
    in a test unless allowed. Cheap when not testing: an attribute lookup or two."""
    if _stand_ins:
        raise NotIsolated(
            f"toot tried to reach {what} while toot.testing's helpers are active, which "
            "keep toot off Redis, the broker and the network: publish() and the callbacks "
            "endpoint are served in memory, but the subscriptions endpoint, "
            "toot_register_subscriptions and replays of dead letters need a real Redis "
            "or peer. Test them outside the helpers, with TOOT['ALLOW_REDIS_IN_TESTS']."
        )
    if outside_helpers and in_test_environment() and not conf.ALLOW_REDIS_IN_TESTS:
        raise NotIsolated(
            f"A test made toot reach {what} ({where(what)}) outside {HELPERS}. A Celery "
            "worker of another environment on that Redis or broker could take the test's "
            "events and run their handlers. Use the helpers or, if this Redis and broker "
            "serve only the tests, set TOOT['ALLOW_REDIS_IN_TESTS'] = True in the test "
            "settings."
        )


def where(what: str) -> str:
    """The URL toot would reach for ``what``, without credentials."""
    if what == "Redis":
        if conf.get("REDIS_CONNECTION") is not None:
            return f"the client of TOOT['REDIS_CONNECTION'] = {conf.get('REDIS_CONNECTION')!r}"
        return bare(conf.REDIS_URL)
    from django.conf import settings  # the broker: Celery's setting, when the project has one

    return bare(str(getattr(settings, "CELERY_BROKER_URL", None) or "Celery's default broker"))


def bare(url: str) -> str:
    """``url`` without its user and password."""
    scheme, separator, rest = url.partition("://")
    if separator and "+" in scheme:  # redis+sentinel:// or redis+cluster://, many hosts
        netloc, slash, path = rest.partition("/")
        return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path.partition('?')[0]}"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return "a URL that cannot be parsed"
    if not parts.scheme or host is None:
        return url if "@" not in url else "a URL with credentials"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{parts.path}"
