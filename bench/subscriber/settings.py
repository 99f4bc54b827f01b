"""The example subscriber's settings, with the benchmark's app (bench/subscriber/)."""

from __future__ import annotations

from example_project.common import MIDDLEWARE, env
from example_project.subscriber import *  # noqa: F403
from example_project.subscriber import INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "bench.subscriber"]
MIDDLEWARE = [*MIDDLEWARE, "bench.subscriber.copies.CopyMiddleware"]
ROOT_URLCONF = "bench.subscriber.urls"
# The most callback URLs the benchmark subscribes: one receipt handler runs for each.
BENCH_COPIES = env.int("BENCH_COPIES", default=1)
