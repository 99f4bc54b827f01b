"""Running local handlers at most once per event, whatever the publisher retries.

Each (event id, handler) is claimed with a Redis key (``SET NX``, for CLAIM_SECONDS)
before the handler runs, and marked done after. The key holds a token of the run that
took it: a run that outlasted its claim must not end the claim another run took since.
Done marks are kept for at least ``DEDUPE_TTL`` seconds, which must outlast the
publisher's retry window, so that a delivery retried after the handler ran does not run
it again.

Done marks are the bulk of toot's Redis memory at any real rate: a key each cost about
220 bytes for three days. So they are 16-byte digests in one hash per hour of the
events' timestamps (about 90 bytes each), and each hash expires DEDUPE_TTL after its
last mark. The claim keys live only while a handler runs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from itertools import chain
from typing import Any

from django.utils import timezone

from toot import deadletters
from toot.conf import conf
from toot.delivery import next_delay
from toot.events import Event
from toot.queue import Retry, new_id
from toot.registry import Handler, registry
from toot.store import as_text, get_redis, run_script

logger = logging.getLogger(__name__)

DONE = "done"
RUNNING = "running"
CLAIMED = "claimed"
# How long a claim protects a running handler; a worker that dies mid-handler leaves
# the claim behind, and the retry after it expires runs the handler again.
CLAIM_SECONDS = 600
HOUR = 3600

# KEYS: (done hash, claim key) per (event, handler); ARGV: claim seconds, the run's
# token, then a field per pair. Returns, per pair, "done", "running" (another holds the
# claim) or "claimed".
CLAIM_SCRIPT = """
local states = {}
for i = 1, #KEYS, 2 do
  local field = ARGV[(i + 1) / 2 + 2]
  if redis.call('HEXISTS', KEYS[i], field) == 1 then
    states[#states + 1] = 'done'
  elseif redis.call('SET', KEYS[i + 1], ARGV[2], 'NX', 'EX', ARGV[1]) then
    states[#states + 1] = 'claimed'
  else
    states[#states + 1] = 'running'
  end
end
return states
"""
# KEYS: done hash, claim key; ARGV: claim seconds, the run's token, its field. Renews a
# claim the run took, unless it ran out and another run took it ("running") or did the
# work meanwhile ("done").
RENEW_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], ARGV[3]) == 1 then return 'done' end
local held = redis.call('GET', KEYS[2])
if held and held ~= ARGV[2] then return 'running' end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
return 'claimed'
"""
# KEYS: done hash, claim key; ARGV: the run's token, its field, and, if it succeeded,
# when the hash may expire ("" if it failed). Marks a success done and ends the claim if
# it is still the run's own, in one step: a run that checks between the two sees either.
END_SCRIPT = """
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[2], 1)
  redis.call('EXPIREAT', KEYS[1], ARGV[3])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
"""


# Stands for every handler of the channel where none was found: its retry (and dead
# letter) runs them all once there are some again.
ALL = "*"


class AlreadyRunning(Exception):
    """Another execution holds the claim on this (event, handler)."""


def handler_name(handler: Handler) -> str:
    # A callable object goes by its class: its repr holds an address, different in each process.
    named = handler if hasattr(handler, "__qualname__") else type(handler)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', '?')}"


def handlers_by_name(channel: str) -> dict[str, Handler]:
    """The channel's handlers by stable name; same-named ones (lambdas) get #2, #3..."""
    named: dict[str, Handler] = {}
    for handler in registry.handlers_for(channel):
        name = base = handler_name(handler)
        n = 1
        while name in named:
            n += 1
            name = f"{base}#{n}"
        named[name] = handler
    return named


def _field(event: Event, name: str) -> bytes:
    return hashlib.blake2b(f"{event.id}\0{name}".encode(), digest_size=16).digest()


def _done_key(event: Event) -> str:
    return f"{conf.KEY_PREFIX}handled:{int(event.timestamp.timestamp()) // HOUR}"


def _claim_key(event: Event, name: str) -> str:
    return _claim_key_of(_field(event, name))


def _claim_key_of(field: bytes) -> str:
    return f"{conf.KEY_PREFIX}handled:running:{field.hex()}"


def _done_until(event: Event) -> int:
    """When the event's hash may go: DEDUPE_TTL after its hour, counted from now at the
    earliest (a late event is remembered as long as any) and an hour from now at the
    latest (a timestamp in the future pins nothing for long)."""
    now = time.time()
    hour_end = (int(event.timestamp.timestamp()) // HOUR + 1) * HOUR
    return int(min(max(hour_end, now), now + HOUR)) + conf.DEDUPE_TTL


def state(event: Event, name: str) -> str | None:
    """DONE, RUNNING or None (neither) for the event's handler ``name``."""
    client = get_redis()
    if client.hexists(_done_key(event), _field(event, name)):
        return DONE
    return RUNNING if client.exists(_claim_key(event, name)) else None


def run(event: Event, names: list[str] | None = None) -> dict[str, Exception]:
    """Run the event's handlers (only ``names`` if given); returns the failures by name."""
    return run_many([(event, names)])[0]


def run_many(
    jobs: list[tuple[Event, list[str] | None]], keep_alive: Callable[[], None] = lambda: None
) -> list[dict[str, Exception]]:
    """Run each event's handlers (only the names given, if any); the failures of each.

    The claims of the whole batch take one round trip. Each run is marked done as soon as
    it returns, not with the batch: a worker killed by a later handler must not leave the
    earlier ones to run again once their claims expire. A claim older than half
    CLAIM_SECONDS is renewed before its handler runs. A name that is no longer subscribed
    (renamed or removed by a deploy) is a failure, not a silent success: its retries and
    its dead letter keep the work visible. ``keep_alive`` is called before each handler
    runs (a drain renews its lease there).
    """
    failures: list[dict[str, Exception]] = []
    planned: list[tuple[int, Event, str, Handler]] = []
    by_channel: dict[str, dict[str, Handler]] = {}  # a batch is mostly of one channel
    for index, (event, names) in enumerate(jobs):
        named = by_channel.get(event.channel)
        if named is None:
            named = by_channel[event.channel] = handlers_by_name(event.channel)
        if names == [ALL]:
            names = None
        if names is None and not named:
            # Unsubscribed since the event was accepted (a deploy), or queued by a project
            # that shares this KEY_PREFIX: kept visible, not dropped as handled.
            failures.append({ALL: LookupError(f"no handler for {event.channel} here")})
            continue
        failures.append(
            {
                name: LookupError(f"{name} is not subscribed to {event.channel} here")
                for name in names or ()
                if name not in named
            }
        )
        planned += [
            (index, event, name, handler)
            for name, handler in named.items()
            if names is None or name in names
        ]
    if not planned:
        return failures
    fields = [_field(event, name) for _, event, name, _ in planned]
    # (done hash, claim key) per planned run, in the order of the scripts' KEYS.
    pairs = [
        (_done_key(event), _claim_key_of(field))
        for (_, event, _, _), field in zip(planned, fields, strict=True)
    ]
    token = new_id()
    states = run_script(CLAIM_SCRIPT, [*chain(*pairs)], [CLAIM_SECONDS, token, *fields])
    claimed_at = time.monotonic()
    for (index, event, name, handler), claim, field, pair in zip(
        planned, states, fields, pairs, strict=True
    ):
        claim = as_text(claim)
        if claim == CLAIMED and time.monotonic() - claimed_at > CLAIM_SECONDS / 2:
            claim = as_text(run_script(RENEW_SCRIPT, pair, [CLAIM_SECONDS, token, field]))
        if claim == DONE:
            logger.info(
                "Event %s on %s: %s already handled it, skipped", event.id, event.channel, name
            )
            continue
        if claim == RUNNING:
            failures[index][name] = AlreadyRunning(
                f"{name} is already running for event {event.id}"
            )
            continue
        keep_alive()
        done_until: int | str = ""
        try:
            handler(event)
        except Exception as exc:
            logger.exception("Event %s on %s: handler %s raised", event.id, event.channel, name)
            failures[index][name] = exc
        else:
            done_until = _done_until(event)
        run_script(END_SCRIPT, pair, [token, field, done_until])
    return failures


def process(items: list[dict[str, Any]], keep_alive: Callable[[], None]) -> list[Retry]:
    """Run the handlers of the claimed items; returns the retries to schedule.

    A handler that failed is retried alone on the publisher's schedule, then dead-lettered.
    """
    jobs = [(Event.from_dict(item["event"]), item.get("handlers")) for item in items]
    retries: list[Retry] = []
    for item, (event, _), failed in zip(items, jobs, run_many(jobs, keep_alive), strict=True):
        attempts = item.get("attempts", 0) + 1
        first_attempt_at = item.get("first_attempt_at") or timezone.now().isoformat()
        if not failed:
            logger.info("Event %s on %s: handled", event.id, event.channel)
            continue
        delay = next_delay(attempts)
        if delay is None:
            for name, error in failed.items():
                deadletters.bury_handler(item["event"], name, attempts, error, first_attempt_at)
            continue
        retry = {
            "event": item["event"],
            "handlers": sorted(failed),
            "attempts": attempts,
            "first_attempt_at": first_attempt_at,
        }
        retries.append((retry, delay))
        logger.warning(
            "Event %s on %s: %d handlers failed (attempt %d), retrying them in %.1fs",
            event.id,
            event.channel,
            len(failed),
            attempts,
            delay,
        )
    return retries
