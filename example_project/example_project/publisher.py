"""The publisher: serves toot/subscriptions and publishes on org.example.publisher.*."""

from __future__ import annotations

from example_project.common import *  # noqa: F403
from example_project.common import BASE_DIR, REDIS_URL, env

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'publisher.sqlite3'}")
}
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_QUEUE", default="publisher")

# Bearer tokens subscribers must send (comma-separated); none leaves the endpoint open.
SUBSCRIPTIONS_TOKENS = env.list("TOOT_SUBSCRIPTIONS_TOKENS", default=[])

# OpenTelemetry traces to a file, as JSON lines (example_project/tracing.py), when set.
TRACE_FILE = env("TOOT_TRACE_FILE", default="")
if TRACE_FILE:
    from example_project.tracing import export_spans_to

    export_spans_to(TRACE_FILE, "publisher")

TOOT = {
    # Spans of publish, deliveries, receipts and handler runs (docs/tracing.md).
    "TRACING": bool(TRACE_FILE),
    "CHANNEL_PREFIX": env("TOOT_CHANNEL_PREFIX", default="org.example.publisher."),
    "SUBSCRIPTIONS_AUTH": {"TOKENS": SUBSCRIPTIONS_TOKENS} if SUBSCRIPTIONS_TOKENS else None,
    # Callback hosts allowed over plain http and on non-public addresses (toot's SSRF guard
    # refuses them otherwise): the example's subscriber runs on this machine.
    "ALLOWED_CALLBACK_HOSTS": env.list(
        "TOOT_ALLOWED_CALLBACK_HOSTS", default=["127.0.0.1", "localhost"]
    ),
    # Addresses allowed although not public (https callbacks only, unless the host is above).
    "ALLOWED_CALLBACK_NETWORKS": env.list(
        "TOOT_ALLOWED_CALLBACK_NETWORKS", default=["127.0.0.0/8", "::1/128"]
    ),
    # whsec_ secrets every delivery is signed with; none: unsigned, as Ruby toot sends.
    "SIGNING_SECRETS": env.list("TOOT_SIGNING_SECRETS", default=[]),
    "REDIS_URL": REDIS_URL,
    # Replicas (Redis Sentinel's) that must hold an event before it counts as kept.
    "REDIS_WAIT_REPLICAS": env.int("TOOT_REDIS_WAIT_REPLICAS", default=0),
    # Its own, if another project shares the Redis: each drains the queues under its prefix.
    "KEY_PREFIX": env("TOOT_KEY_PREFIX", default="toot:publisher:"),
    "RETRY_SCHEDULE": env.list(
        "TOOT_RETRY_SCHEDULE", cast=float, default=[5, 300, 1800, 7200, 18000, 36000, 36000]
    ),
    # How long a drain whose worker died keeps what it held before another takes it over.
    "LEASE_SECONDS": env.float("TOOT_LEASE_SECONDS", default=60.0),
    # How long a subscriber may take to answer, and how many requests it gets at once.
    "READ_TIMEOUT": env.float("TOOT_READ_TIMEOUT", default=15.0),
    "MAX_IN_FLIGHT": env.int("TOOT_MAX_IN_FLIGHT", default=8),
    # A subscriber failing this many times in a row gets a rest of that many seconds.
    "BREAKER_FAILURES": env.int("TOOT_BREAKER_FAILURES", default=5),
    "BREAKER_SECONDS": env.float("TOOT_BREAKER_SECONDS", default=30.0),
    # Prometheus metrics, served at /metrics (docs/metrics.md); needs prometheus_client.
    "METRICS": env.bool("TOOT_METRICS", default=False),
}
