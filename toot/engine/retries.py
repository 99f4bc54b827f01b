"""When to try again after a failure: a delivery's or a handler's, on ``RETRY_SCHEDULE``."""

from __future__ import annotations

import random

from toot.conf import conf

JITTER = 0.2
# A subscriber may ask for a longer pause than the schedule's, but not for ever.
MAX_RETRY_AFTER_EXTRA = 2 * 3600.0


def next_delay(attempts: int, retry_after: float | None = None) -> float | None:
    """Seconds to wait after ``attempts`` failed attempts; None once the schedule is spent.

    ``RETRY_SCHEDULE[n]`` ±20 % follows attempt n+1. A Retry-After (429/503) is honoured
    when longer, up to two hours beyond the schedule's delay.
    """
    schedule = conf.RETRY_SCHEDULE
    if attempts > len(schedule):
        return None
    backoff = schedule[attempts - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        return min(max(backoff, retry_after), backoff + MAX_RETRY_AFTER_EXTRA)
    return backoff
