"""The sample project's settings: the same for its tests as for development."""

from __future__ import annotations

import os

SECRET_KEY = "sample-project-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost"]
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "toot",
    "accounts",
]
ROOT_URLCONF = "sample.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
USE_TZ = True

# Development's Redis, and its broker: what a test must never reach.
REDIS_URL = os.environ.get("SAMPLE_REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL

TOOT = {
    # It publishes on org.example.accounts.*
    "CHANNEL_PREFIX": "org.example.accounts.",
    # and subscribes to billing's invoices, which billing signs.
    "CALLBACK_URL": "https://accounts.example.org/toot/callbacks",
    "SOURCES": {
        "billing": {
            "SUBSCRIPTION_URL": "https://billing.example.org/toot/subscriptions",
            "CHANNEL_PREFIX": "org.example.billing.",
            "SECRET": "whsec_c2FtcGxlLXByb2plY3Qtc2lnbmluZy1rZXktMDEyMzQ=",
        },
    },
    "REDIS_URL": REDIS_URL,
    "SUBSCRIPTIONS_AUTH": {"TOKENS": ["sample-subscriber-token"]},
}
