"""Celery tasks: fan an event out to its subscribers, deliver it, run local handlers.

Tasks are ``shared_task``s, so they bind to whatever Celery app the project has. They
take the event's wire dict, never objects, and are acknowledged late so that a worker
killed mid-task leaves the message to be redelivered.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import requests
from celery import Task, shared_task

from toot import client, store
from toot.conf import conf
from toot.events import Event
from toot.exceptions import CallbackFailure
from toot.registry import registry

logger = logging.getLogger(__name__)

RELIABLE = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}
JITTER = 0.2


def retry_delay(attempt: int) -> float | None:
    """Seconds before retry number ``attempt`` (0-based), ±20 %; None once the schedule is spent."""
    schedule = conf.RETRY_SCHEDULE
    if attempt >= len(schedule):
        return None
    return schedule[attempt] * random.uniform(1 - JITTER, 1 + JITTER)


@shared_task(name="toot.fan_out", **RELIABLE)
def fan_out(event: dict[str, Any]) -> int:
    """Start one delivery per callback URL subscribed to the event's channel."""
    urls = store.callback_urls(event["channel"])
    for url in urls:
        deliver.delay(event, url)
    logger.info(
        "Event %s on %s: %d deliveries started", event["id"], event["channel"], len(urls)
    )
    return len(urls)


@shared_task(bind=True, name="toot.deliver", **RELIABLE)
def deliver(self: Task[Any, Any], event: dict[str, Any], callback_url: str) -> int:
    event_id, channel = event["id"], event["channel"]
    attempt = self.request.retries + 1
    try:
        response = client.post_json(callback_url, json.dumps(event, separators=(",", ":")))
        if not response.ok:
            raise CallbackFailure(callback_url, response.status, response.excerpt())
    except (CallbackFailure, requests.RequestException) as exc:
        delay = retry_delay(self.request.retries)
        if delay is None:
            logger.error(
                "Event %s on %s: delivery to %s failed for good after %d attempts: %s",
                event_id, channel, callback_url, attempt, exc,
            )
            raise
        logger.warning(
            "Event %s on %s: delivery to %s failed (attempt %d), retrying in %.1fs: %s",
            event_id, channel, callback_url, attempt, delay, exc,
        )
        raise self.retry(exc=exc, countdown=delay, max_retries=None) from exc
    logger.info(
        "Event %s on %s: delivered to %s (status %d, attempt %d)",
        event_id, channel, callback_url, response.status, attempt,
    )
    if "X-Toot-Unsubscribe" in response.headers:
        store.remove(channel, callback_url)
        logger.info(
            "Event %s on %s: %s asked to unsubscribe; removed", event_id, channel, callback_url
        )
    return response.status


@shared_task(name="toot.handle", **RELIABLE)
def handle(event: dict[str, Any]) -> int:
    """Run every local handler subscribed to the event's channel.

    Every handler runs even if one raises; the first error is raised again afterwards so
    that the task is marked failed.
    """
    ev = Event.from_dict(event)
    handlers = registry.handlers_for(ev.channel)
    errors: list[Exception] = []
    for handler in handlers:
        try:
            handler(ev)
        except Exception as exc:
            logger.exception(
                "Event %s on %s: handler %s raised", ev.id, ev.channel, getattr(handler, "__qualname__", handler)
            )
            errors.append(exc)
    if errors:
        raise errors[0]
    logger.info("Event %s on %s: %d handlers ran", ev.id, ev.channel, len(handlers))
    return len(handlers)
