"""Celery tasks: fan an event out to its subscribers, deliver it, run local handlers.

Tasks are ``shared_task``s, so they bind to whatever Celery app the project has. They
take the event's wire dict, never objects. They are acknowledged late and rejected when
their worker is lost, so that a worker killed mid-task leaves the message to be
redelivered (see "Deployment" in the README for the broker's ``visibility_timeout``).
A failed attempt is not retried with a Celery countdown but written to
``toot.retries``, which survives any worker.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task, shared_task
from django.utils import timezone
from kombu.exceptions import OperationalError

import toot.relay  # noqa: F401 - connects the relay to the worker's signals
from toot import deadletters, delivery, handling, retries, store
from toot.events import Event
from toot.exceptions import CallbackFailure

logger = logging.getLogger(__name__)


class TootTask(Task[Any, Any]):
    """Acknowledged late and rejected on worker loss, so a killed worker loses no message.

    Errors of our own infrastructure (Redis, the broker) being briefly away get short,
    bounded Celery retries; failed deliveries and handlers go to ``toot.retries``.
    """

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    autoretry_for = (redis.RedisError, OperationalError)
    retry_backoff = 1
    retry_backoff_max = 60
    max_retries = 20


@shared_task(base=TootTask, name="toot.fan_out")
def fan_out(event: dict[str, Any]) -> int:
    """Start one delivery per callback URL subscribed to the event's channel."""
    urls = store.callback_urls(event["channel"])
    for url in urls:
        deliver.delay(event, url)
    logger.info("Event %s on %s: %d deliveries started", event["id"], event["channel"], len(urls))
    return len(urls)


def origin_queue(task: Task[Any, Any]) -> str:
    """The queue ``task``'s message came from: its retries go back there."""
    routing_key = (task.request.delivery_info or {}).get("routing_key")
    for queue in task.app.amqp.queues.values():
        if routing_key in (queue.name, queue.routing_key):
            return str(queue.name)
    return str(task.app.conf.task_default_queue)


@shared_task(bind=True, base=TootTask, name="toot.deliver")
def deliver(
    self: Task[Any, Any],
    event: dict[str, Any],
    callback_url: str,
    attempts: int = 0,
    first_attempt_at: str | None = None,
) -> None:
    """One attempt to POST the event; a failure is scheduled again or dead-lettered.

    A dead-lettered delivery also raises CallbackFailure, so that the task is marked
    failed where Celery monitoring and error trackers look.
    """
    event_id, channel = event["id"], event["channel"]
    attempts += 1
    first_attempt_at = first_attempt_at or timezone.now().isoformat()
    outcome = delivery.attempt(event, callback_url)
    if outcome.ok or outcome.gone:
        logger.info(
            "Event %s on %s: delivered to %s (status %s, attempt %d)",
            event_id,
            channel,
            callback_url,
            outcome.status,
            attempts,
        )
        return
    # A URL the SSRF guard refused is dead-lettered at once (see delivery.Outcome.refused).
    delay = None if outcome.refused else delivery.next_delay(attempts, outcome.retry_after)
    if delay is None:
        deadletters.bury_delivery(event, callback_url, attempts, outcome, first_attempt_at)
        raise CallbackFailure(callback_url, outcome.status, outcome.error)
    retries.schedule(
        "toot.deliver",
        [event, callback_url],
        {"attempts": attempts, "first_attempt_at": first_attempt_at},
        delay,
        origin_queue(self),
    )
    logger.warning(
        "Event %s on %s: delivery to %s failed (attempt %d, status %s: %s), retrying in %.1fs",
        event_id,
        channel,
        callback_url,
        attempts,
        outcome.status,
        outcome.error,
        delay,
    )


@shared_task(bind=True, base=TootTask, name="toot.handle")
def handle(
    self: Task[Any, Any],
    event: dict[str, Any],
    handlers: list[str] | None = None,
    attempts: int = 0,
    first_attempt_at: str | None = None,
) -> None:
    """Run the event's local handlers (on a retry, only those that failed).

    Once the schedule is spent the failures are dead-lettered and the first is raised.
    """
    ev = Event.from_dict(event)
    attempts += 1
    first_attempt_at = first_attempt_at or timezone.now().isoformat()
    failures = handling.run(ev, handlers)
    if not failures:
        logger.info("Event %s on %s: handled", ev.id, ev.channel)
        return
    delay = delivery.next_delay(attempts)
    if delay is None:
        for name, error in failures.items():
            deadletters.bury_handler(event, name, attempts, error, first_attempt_at)
        raise next(iter(failures.values()))  # as deliver does: the task is marked failed
    retries.schedule(
        "toot.handle",
        [event],
        {"handlers": sorted(failures), "attempts": attempts, "first_attempt_at": first_attempt_at},
        delay,
        origin_queue(self),
    )
    logger.warning(
        "Event %s on %s: %d handlers failed (attempt %d), retrying them in %.1fs",
        ev.id,
        ev.channel,
        len(failures),
        attempts,
        delay,
    )
