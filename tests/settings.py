"""Settings for toot's own tests: Redis and the database come from the environment."""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

import environ

from devtools.redis_server import ensure_redis_url

env = environ.Env()

# One id per test run, shared with the processes the run starts: Redis keys and Celery
# queues carry it, so that runs never see each other's data.
RUN_ID = os.environ.setdefault("TOOT_TEST_RUN_ID", uuid.uuid4().hex[:12])
REDIS_URL = ensure_redis_url("TOOT_TEST_REDIS_URL")

SECRET_KEY = "toot-tests"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.messages",
    "django.contrib.sessions",
    # The live server serves the admin's CSS, for the browser test's screenshots.
    "django.contrib.staticfiles",
    "toot",
]
# What django.contrib.admin needs, for the dead letter admin's tests.
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
ROOT_URLCONF = "tests.urls"
DATABASES = {"default": env.db("DATABASE_URL", default="sqlite://:memory:")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not SQLite's shared-cache memory database: worker threads write dead letters
    # while tests read them, and that database fails a blocked reader at once instead of
    # waiting.
    DATABASES["default"]["TEST"] = {
        "NAME": os.path.join(tempfile.gettempdir(), f"toot-test-{RUN_ID}.sqlite3")
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
    # Django 5.2's default, as a project on 4.2 must set it: 4.2 talks utf8mb3, which
    # refuses four-byte characters and on MariaDB makes JSON key lookups match nothing.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("charset", "utf8mb4")
# A second database, for what a project with several must get right: publish() inside an
# atomic block on it, the outbox read from the primary when reads go to a replica.
DATABASES["other"] = {
    "ENGINE": "django.db.backends.sqlite3",
    # A name even outside tests: Django 6.1's checks open every database (manage.py check).
    "NAME": ":memory:",
    "TEST": {"NAME": os.path.join(tempfile.gettempdir(), f"toot-test-{RUN_ID}-other.sqlite3")},
}
USE_TZ = True
STATIC_URL = "/static/"

# The tests' publisher leaves its subscriptions endpoint open, as the Ruby gem does and as
# most tests need; tests/test_checks.py unsilences the warning where it tests it.
SILENCED_SYSTEM_CHECKS = ["toot.W003"]

# Celery's broker: the tests' Redis, unless $TOOT_TEST_BROKER_URL names another, such as
# the RabbitMQ of .ci/run's last pass (amqp://guest:guest@127.0.0.1:5672//). toot's queues
# stay in Redis whichever it is. A Redis Cluster (toot's Redis in .ci/run's Cluster pass)
# cannot be Celery's broker.
CELERY_BROKER_URL = env("TOOT_TEST_BROKER_URL", default=REDIS_URL)
CELERY_TASK_DEFAULT_QUEUE = f"toot-test-{RUN_ID}"
CELERY_TASK_IGNORE_RESULT = True

TOOT: dict[str, Any] = {
    "CHANNEL_PREFIX": "org.example.test.",
    "CALLBACK_URL": "http://testserver/toot/callbacks",
    "SOURCES": {
        "publisher": {
            "SUBSCRIPTION_URL": "http://publisher.example/toot/subscriptions",
            "CHANNEL_PREFIX": "org.example.publisher.",
        },
    },
    "REDIS_URL": REDIS_URL,
    "KEY_PREFIX": f"toot-test-{RUN_ID}:",
    "RETRY_SCHEDULE": [0.1, 0.2, 0.4],
    "RELAY_INTERVAL": 0.05,
    # The tests' subscribers are live servers on loopback, reached over plain http, and
    # names under the reserved .example domain that nothing delivers to. Allowed
    # explicitly, as a project must: tests/test_ssrf.py checks the rules without them.
    "ALLOWED_CALLBACK_HOSTS": ["127.0.0.1", "localhost", "testserver", ".example"],
    "ALLOWED_CALLBACK_NETWORKS": ["127.0.0.0/8", "::1/128"],
    # The suite's Redis and broker are its own (this run's key prefix and Celery queue):
    # toot reaches them from tests outside toot.testing's helpers.
    "ALLOW_REDIS_IN_TESTS": True,
}
