from __future__ import annotations

import pytest
from celery.contrib.testing.worker import start_worker
from django.conf import settings

from devtools.processes import wait_for
from tests.celery import app as celery_app
from toot import relay, store
from toot.registry import registry


@pytest.fixture
def redis():
    """The store's real Redis; every key of this run's namespace is removed afterwards."""
    client = store.get_redis()
    yield client
    keys = list(client.scan_iter(match=f"{settings.TOOT['KEY_PREFIX']}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture(autouse=True)
def _clean_registry():
    saved = registry.subscriptions
    registry.reset()
    yield
    registry.reset()
    for subscription in saved:
        registry.register(*subscription)


@pytest.fixture(scope="session")
def _worker_session():
    """A real Celery worker in this process, consuming this run's queue."""
    with start_worker(celery_app, pool="threads", concurrency=4, perform_ping_check=False,
                      shutdown_timeout=30) as worker:
        # The CLI worker starts the relay on worker_ready. Its outbox step needs the
        # database, which most tests may not touch; test_outbox runs that step itself.
        relay.start(celery_app, [settings.CELERY_TASK_DEFAULT_QUEUE], outbox=False)
        yield worker
        relay.stop()
    client = store.get_redis()
    client.delete(settings.CELERY_TASK_DEFAULT_QUEUE)


@pytest.fixture
def celery_worker(_worker_session, redis):
    yield _worker_session


@pytest.fixture
def eventually():
    """Poll for an outcome with a deadline instead of sleeping."""
    def poll(predicate, timeout=20.0, what="the expected outcome"):
        wait_for(predicate, timeout, what)
    return poll
