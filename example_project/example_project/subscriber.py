"""The subscriber: serves toot/callbacks; example_app subscribes to the publisher."""

from __future__ import annotations

from example_project.common import *  # noqa: F403
from example_project.common import BASE_DIR, INSTALLED_APPS, REDIS_URL, env

INSTALLED_APPS = [*INSTALLED_APPS, "example_app"]
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'subscriber.sqlite3'}")
}
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_QUEUE", default="subscriber")

# It serves toot/subscriptions too (include("toot.urls")): closed the same way.
SUBSCRIPTIONS_TOKENS = env.list("TOOT_SUBSCRIPTIONS_TOKENS", default=[])

# OpenTelemetry traces to a file, as JSON lines (example_project/tracing.py), when set.
TRACE_FILE = env("TOOT_TRACE_FILE", default="")
if TRACE_FILE:
    from example_project.tracing import export_spans_to

    export_spans_to(TRACE_FILE, "subscriber")

TOOT = {
    # Spans of publish, deliveries, receipts and handler runs (docs/tracing.md).
    "TRACING": bool(TRACE_FILE),
    "SUBSCRIPTIONS_AUTH": {"TOKENS": SUBSCRIPTIONS_TOKENS} if SUBSCRIPTIONS_TOKENS else None,
    "CALLBACK_URL": env("TOOT_CALLBACK_URL", default="http://127.0.0.1:8002/toot/callbacks"),
    # Ask sources for batches of events (a Ruby publisher ignores it and sends single events).
    "BATCH": env.bool("TOOT_BATCH", default=True),
    # Events per second this subscriber asks its source for at most; none: no limit.
    "RATE_LIMIT": env.float("TOOT_RATE_LIMIT", default=None),
    "SOURCES": {
        "publisher": {
            "SUBSCRIPTION_URL": env(
                "TOOT_PUBLISHER_SUBSCRIPTION_URL",
                default="http://127.0.0.1:8001/toot/subscriptions",
            ),
            "CHANNEL_PREFIX": env(
                "TOOT_PUBLISHER_CHANNEL_PREFIX", default="org.example.publisher."
            ),
            # Sent when registering, if the publisher requires a token.
            "TOKEN": env("TOOT_PUBLISHER_TOKEN", default=None),
            # The publisher's signing secrets; none: its deliveries are accepted unsigned.
            "SECRETS": env.list("TOOT_PUBLISHER_SECRETS", default=[]),
        },
    },
    "REDIS_URL": REDIS_URL,
    # Replicas (Redis Sentinel's) that must hold an event before it counts as kept.
    "REDIS_WAIT_REPLICAS": env.int("TOOT_REDIS_WAIT_REPLICAS", default=0),
    "KEY_PREFIX": env("TOOT_KEY_PREFIX", default="toot:subscriber:"),
    # When a handler that raised runs again, and then becomes a dead letter.
    "RETRY_SCHEDULE": env.list(
        "TOOT_RETRY_SCHEDULE", cast=float, default=[5, 300, 1800, 7200, 18000, 36000, 36000]
    ),
    # How long a drain whose worker died keeps what it held before another takes it over.
    "LEASE_SECONDS": env.float("TOOT_LEASE_SECONDS", default=60.0),
    # Prometheus metrics, served at /metrics (docs/metrics.md); needs prometheus_client.
    "METRICS": env.bool("TOOT_METRICS", default=False),
}
# How long the example handler takes per event (the fault tests give it a moment).
EXAMPLE_HANDLER_SECONDS = env.float("EXAMPLE_HANDLER_SECONDS", default=0.0)
# Where the example handler records each event it ran for (the demo and tests read it).
EXAMPLE_RECEIPTS_KEY = env("EXAMPLE_RECEIPTS_KEY", default="example:receipts")
