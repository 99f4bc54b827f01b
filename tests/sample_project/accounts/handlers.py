from __future__ import annotations

from django.core.cache import cache

import toot


def invoice_paid(event: toot.Event) -> None:
    """Count the user's paid invoices."""
    key = f"paid-invoices:{event['user']}"
    cache.set(key, cache.get(key, 0) + 1)


async def invoice_refunded(event: toot.Event) -> None:
    """Remember the refund; async, as a handler that awaits other services is."""
    await cache.aset(f"refund:{event['invoice']}", event["amount"])
