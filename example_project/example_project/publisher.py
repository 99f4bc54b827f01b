"""The publisher: serves toot/subscriptions and publishes on org.example.publisher.*."""

from __future__ import annotations

from example_project.common import *  # noqa: F403
from example_project.common import REDIS_URL, env

CELERY_TASK_DEFAULT_QUEUE = env("CELERY_QUEUE", default="publisher")

TOOT = {
    "CHANNEL_PREFIX": env("TOOT_CHANNEL_PREFIX", default="org.example.publisher."),
    "REDIS_URL": REDIS_URL,
    "KEY_PREFIX": env("TOOT_KEY_PREFIX", default="toot:"),
    "RETRY_SCHEDULE": env.list("TOOT_RETRY_SCHEDULE", cast=float, default=[5, 300, 1800, 7200, 18000, 36000, 36000]),
}
