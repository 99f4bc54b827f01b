"""Django signals for what happens to events and subscriptions, for a project's own code.

Each is a plain ``django.dispatch.Signal``; connect a receiver with ``@receiver(...)`` in
``AppConfig.ready()``, as for Django's own. toot sends them through ``send()``, which uses
``send_robust``: a receiver that raises is logged (logger ``toot.signals``) and changes
nothing, so that a project's bug never fails, retries or loses a delivery or a handler
run. With no receiver connected a signal costs one attribute test, since deliveries run
at thousands a second.

Receivers run in the thread that sends: a sender thread of the publisher's worker, a
drain of the subscriber's, or a web request. Keep them short; what takes time belongs in
a task of the project's own. Every signal's keyword arguments are listed in docs/api.md.

The deliveries' signals are sent once per request, with its ``events``, not once per
event: a batch is one request, delivered or failed as a whole.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger(__name__)

# publish() handed the event to Redis, or to the outbox when Redis was down: after the
# caller's transaction committed. Sent in the publishing process (web or any).
# sender: toot.Event; event, outbox (bool).
event_published = Signal()

# A delivery (one event, or a batch of one channel) answered 2xx. Publisher's worker.
# sender: toot.Event; callback_url, channel, events, delivery_id, batch, attempt, status,
# duration.
delivery_succeeded = Signal()

# A delivery failed: no answer, a non-2xx, 410 included, or not sent at all. Publisher's
# worker. sender: toot.Event; as delivery_succeeded, status (None without an answer), error,
# duration (None when no request was sent), retry_in (seconds, None when not retried).
delivery_failed = Signal()

# A delivery's event or a handler run failed every attempt and became a DeadLetter row.
# Worker of the side that filed it. sender: toot.models.DeadLetter; dead_letter, event,
# kind ("delivery" or "handler").
dead_lettered = Signal()

# A subscriber registered (or registered again). Publisher's web process.
# sender: toot.models.Subscription; channel, callback_url, created, batch, rate_limit.
subscription_added = Signal()

# A subscription was removed. sender: toot.models.Subscription; channel, callback_url,
# reason: "request" (DELETE on the endpoint, web), "admin" (web), "gone" (a 410) or
# "unsubscribe" (X-Toot-Unsubscribe) (the publisher's worker, or toot_redeliver's process).
subscription_removed = Signal()

# The callbacks endpoint took an event or a batch. Subscriber's web process.
# sender: toot.Event; events, channel, handlers (names; [] when it asked to unsubscribe).
event_received = Signal()

# A handler returned. Subscriber's worker. sender: toot.Event; event, handler (its name),
# attempt, duration.
handler_succeeded = Signal()

# A handler raised (or is no longer subscribed here). Subscriber's worker.
# sender: toot.Event; event, handler, attempt, error (the exception), duration (None when
# it did not run), retry_in (seconds, None when not retried).
handler_failed = Signal()


def send(signal: Signal, sender: Any, what: str, **kwargs: Any) -> None:
    """Send ``signal`` to its receivers, logging each that raised, with ``what`` (the
    event, the delivery or the subscription, as toot's log lines name it)."""
    if not signal.receivers:  # the common case, before send_robust's own bookkeeping
        return
    for receiver, result in signal.send_robust(sender, **kwargs):
        if isinstance(result, Exception):
            logger.error(
                "%s: receiver %s of %s raised, ignored: %r",
                what,
                getattr(receiver, "__qualname__", receiver),
                NAMES.get(signal, "a toot signal"),
                result,
                exc_info=result,
            )


def wanted(*signals: Signal) -> bool:
    """Whether any of ``signals`` has receivers: what a caller checks before building
    costly arguments."""
    return any(signal.receivers for signal in signals)


NAMES = {
    signal: f"toot.signals.{name}"
    for name, signal in list(globals().items())
    if isinstance(signal, Signal)
}
