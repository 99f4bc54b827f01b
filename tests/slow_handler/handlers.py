from __future__ import annotations

import time

from django.conf import settings

import toot
from example_app.handlers import record


def report_requested(event: toot.Event) -> None:
    """Takes SLOW_HANDLER_SECONDS, then records its receipt as the example's handlers do."""
    time.sleep(getattr(settings, "SLOW_HANDLER_SECONDS", 1.0))  # a project setting
    record(event)
