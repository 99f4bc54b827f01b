"""The subscriber: serves toot/callbacks; example_app subscribes to the publisher."""

from __future__ import annotations

from example_project.common import *  # noqa: F403
from example_project.common import INSTALLED_APPS, REDIS_URL, env

INSTALLED_APPS = [*INSTALLED_APPS, "example_app"]
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_QUEUE", default="subscriber")

TOOT = {
    "CALLBACK_URL": env("TOOT_CALLBACK_URL", default="http://127.0.0.1:8002/toot/callbacks"),
    "SOURCES": {
        "publisher": {
            "SUBSCRIPTION_URL": env(
                "TOOT_PUBLISHER_SUBSCRIPTION_URL", default="http://127.0.0.1:8001/toot/subscriptions"
            ),
            "CHANNEL_PREFIX": env("TOOT_PUBLISHER_CHANNEL_PREFIX", default="org.example.publisher."),
        },
    },
    "REDIS_URL": REDIS_URL,
    "KEY_PREFIX": env("TOOT_KEY_PREFIX", default="toot:"),
}
# Where the example handler records each event it ran for (the demo and tests read it).
EXAMPLE_RECEIPTS_KEY = env("EXAMPLE_RECEIPTS_KEY", default="example:receipts")
