"""Durable retries: pending attempts wait in Redis, not in Celery ETA messages.

With the Redis broker an ETA task is held by the worker that fetched it: a worker
killed with -9 loses it, and one whose delay exceeds ``visibility_timeout`` runs twice
(celery/celery#2599, #4400, #7009, #3501). So a retry is written to a sorted set scored
by its due time, and a relay in every worker moves due entries onto the queue.

A relay claims entries with one atomic move into a "claimed" set, so two relays never
send the same attempt; an entry whose relay died between claim and send goes back to
the due set after ``CLAIM_TIMEOUT`` seconds.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from celery import Celery

from toot.broker import send_now
from toot.conf import conf
from toot.store import as_text, get_redis

logger = logging.getLogger(__name__)

CLAIM_TIMEOUT = 60.0
BATCH = 500

# KEYS: due, claimed, data; ARGV: now, limit. Moves due ids to claimed and returns
# [id, data, id, data, ...].
CLAIM_SCRIPT = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], ARGV[1], id)
  table.insert(out, id)
  table.insert(out, redis.call('HGET', KEYS[3], id) or '')
end
return out
"""
# KEYS: claimed, due; ARGV: stale-before, now. Gives back what a dead relay claimed.
RECOVER_SCRIPT = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZADD', KEYS[2], ARGV[2], id)
end
return #ids
"""


def _keys(queue: str) -> tuple[str, str, str]:
    # Per queue: projects that share a Redis and a KEY_PREFIX (and so the retry sets)
    # each relay only what their own workers consume.
    base = f"{conf.KEY_PREFIX}retries:{queue}:"
    return f"{base}due", f"{base}claimed", f"{base}data"


def schedule(task: str, args: list[Any], kwargs: dict[str, Any], delay: float, queue: str) -> str:
    """Send ``task(*args, **kwargs)`` to ``queue`` in ``delay`` seconds, whatever crashes."""
    due, _, data = _keys(queue)
    retry_id = uuid.uuid4().hex
    with get_redis().pipeline(transaction=True) as pipe:
        pipe.hset(data, retry_id, json.dumps({"task": task, "args": args, "kwargs": kwargs}))
        pipe.zadd(due, {retry_id: time.time() + delay})
        pipe.execute()
    return retry_id


def pending(queue: str) -> int:
    """How many retries for ``queue`` wait, claimed or not."""
    due, claimed, _ = _keys(queue)
    client = get_redis()
    return int(client.zcard(due)) + int(client.zcard(claimed))


def relay_due(app: Celery, queues: Iterable[str], limit: int = BATCH) -> int:
    """Send every retry that is due for ``queues`` through ``app``; returns how many."""
    client = get_redis()
    sent = 0
    for queue in queues:
        due, claimed, data = _keys(queue)
        now = time.time()
        client.eval(RECOVER_SCRIPT, 2, claimed, due, now - CLAIM_TIMEOUT, now)
        claimed_items = client.eval(CLAIM_SCRIPT, 3, due, claimed, data, now, limit)
        for retry_id, raw in zip(claimed_items[::2], claimed_items[1::2], strict=True):
            if raw:
                try:
                    entry = json.loads(raw)
                    task = app.tasks[entry["task"]]
                except (ValueError, KeyError):
                    # Not ours to understand (another toot version?): leave it claimed,
                    # where the next relay finds it again, and go on with the rest.
                    logger.error(
                        "Retry %s for %s cannot be sent: %.200s",
                        as_text(retry_id),
                        queue,
                        as_text(raw),
                    )
                    continue
                send_now(task, entry["args"], kwargs=entry["kwargs"], queue=queue)
                sent += 1
            with client.pipeline(transaction=True) as pipe:
                pipe.zrem(claimed, retry_id)
                pipe.hdel(data, retry_id)
                pipe.execute()
    if sent:
        logger.info("Relayed %d due retries", sent)
    return sent
