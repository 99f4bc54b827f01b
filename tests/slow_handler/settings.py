"""The example subscriber's settings, with the slow handler's app."""

from __future__ import annotations

from example_project.subscriber import *  # noqa: F403
from example_project.subscriber import INSTALLED_APPS, env

INSTALLED_APPS = [*INSTALLED_APPS, "tests.slow_handler"]
SLOW_HANDLER_SECONDS = env.float("SLOW_HANDLER_SECONDS", default=1.0)
# The Celery queue of the slow handler's drains; none: the project's default queue.
SLOW_HANDLER_QUEUE = env("SLOW_HANDLER_QUEUE", default=None)
