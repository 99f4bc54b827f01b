"""Work queues in Redis, drained in batches by ``toot.drain`` tasks.

One Celery message per event (fan out, deliver, handle) cost more CPU than the delivery
itself. Instead, publishing and the callback endpoint push events onto a Redis list, and
a few drain tasks take them off in batches. Each queue (``out``: deliveries to send,
``in``: handlers to run) lives under ``KEY_PREFIX + "queue:{<KEY_PREFIX>name}:"``, one
Redis Cluster hash slot per queue. A queue may have
lanes, ``<queue>:<lane>``, each a queue of its own with its own drains, pushed to with
``push_many`` and listed in the ``KEY_PREFIX + "queue:lanes"`` SET for the relay to wake:
the subscriber's ``in`` has one per handler, so that a slow handler holds back only its
own events. Each queue (or lane) holds:

- ``ready``: a LIST of items waiting, oldest first;
- ``delayed``: a ZSET of items scored by when they are due (failed attempts);
- ``leases``: a ZSET of drain ids scored by when their lease ends; a pusher starts a
  drain when none runs, or when the backlog outgrows the running ones, up to
  ``MAX_DRAINS``;
- ``claimed:<drain id>``: a LIST of the items that drain holds.

A drain claims with one atomic move from ``ready`` to its own ``claimed`` list and
removes that list once the batch is done, in the same transaction as any retries it
schedules. A drain that dies leaves its list behind; when its lease runs out, the relay
(``toot.engine.relay``) moves the list back to ``ready``. Every time is Redis' own (``TIME``),
so drains on many machines agree whatever their clocks say.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from toot.conf import conf
from toot.engine.connection import as_text, get_redis, run_script, run_scripts, slot
from toot.engine.per_process import PerProcess
from toot.exceptions import LeaseLost

OUT = "out"  # publisher side: events to fan out, deliveries to retry
IN = "in"  # subscriber side: events whose handlers are to run
QUEUES = (OUT, IN)

# What a queue holds: a JSON object whose shape is its side's (toot.publisher.sending's
# OutItem, toot.subscriber.handling's InItem); the engine only stores and hands it back.
Item = Mapping[str, Any]
# An item to schedule again, and in how many seconds.
Retry = tuple[Item, float]

# What a failing drain held, or a delivery whose outcome could not be recorded, is tried
# again after this long: not at once and not in a loop.
FAILED_WORK_DELAY = 10.0

# Another drain starts when more than this many items per running drain wait: a steady
# trickle stays with the drain that has it (no Celery message per event), a burst gets up
# to MAX_DRAINS.
BACKLOG_PER_DRAIN = 20

# Binds ``now`` to Redis' clock, for the scripts here and in toot.subscriber.handling.
NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""


def room(key: str) -> str:
    """Lua that lets the rest of a script write on a Redis over its maxmemory.

    With ``noeviction``, a full Redis refuses a script's first write that needs memory, but
    lets a script that has written finish, as it cannot stop halfway. So the steps that
    move work along or end it, and so make room (a lease, a claim, a failing drain giving
    its batch back), first write nothing with a ZREM of a member no key holds: a full Redis
    still lets toot empty it, and refuses only new work (publish() then keeps the event in
    the outbox, the callbacks endpoint answers 503). ``key`` is a sorted set of the
    script's KEYS.
    """
    return f"redis.call('ZREM', {key}, '')\n"


# Puts what a drain's claimed list holds back at the front of ready, first in order.
_GIVE_BACK = """
local function give_back(ready, claimed)
  local items = redis.call('LRANGE', claimed, 0, -1)
  for i = #items, 1, -1 do redis.call('LPUSH', ready, items[i]) end
  redis.call('DEL', claimed)
end
"""
# Takes a lease for drain_id and returns it when a drain should start, else false.
_START = f"""
local function start(ready, leases, max_drains, lease_seconds, drain_id)
  local live = redis.call('ZCOUNT', leases, now, '+inf')
  if live >= tonumber(max_drains) then return false end
  if live > 0 and redis.call('LLEN', ready) <= live * {BACKLOG_PER_DRAIN} then return false end
  redis.call('ZADD', leases, now + tonumber(lease_seconds), drain_id)
  return drain_id
end
"""
# KEYS: ready, leases; ARGV: max drains, lease seconds, new drain id, items...
PUSH_SCRIPT = (
    NOW
    + _START
    + """
for i = 4, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
return start(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
"""
)
# KEYS: ready, delayed, leases, claimed; ARGV: drain id, limit, lease seconds, first
# ("1" for a run's first claim), then pairs of retry item and delay. Ends the drain's last
# batch (its retries scheduled, its items dropped), renews the lease, makes due retries
# ready, and claims up to limit items. A run's first claim has no last batch: what the
# list holds then is a dead run's under the same id, and goes back to the front of ready.
# Once the lease is gone it returns false, and renews and claims nothing. The last batch
# is then ended only if the list still holds it: else the relay gave it to another drain,
# which sends it and schedules its retries.
CLAIM_SCRIPT = (
    NOW
    + room("KEYS[3]")
    + _GIVE_BACK
    + """
local leased = redis.call('ZSCORE', KEYS[3], ARGV[1])
if ARGV[4] == '1' then give_back(KEYS[1], KEYS[4]) end
if leased or redis.call('EXISTS', KEYS[4]) == 1 then
  for i = 5, #ARGV, 2 do redis.call('ZADD', KEYS[2], now + tonumber(ARGV[i + 1]), ARGV[i]) end
  redis.call('DEL', KEYS[4])
end
if not leased then return false end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
local limit = tonumber(ARGV[2])
if limit < 1 then return {} end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, item in ipairs(due) do
  redis.call('ZREM', KEYS[2], item)
  redis.call('RPUSH', KEYS[1], item)
end
local items = redis.call('LRANGE', KEYS[1], 0, limit - 1)
if #items > 0 then
  redis.call('LTRIM', KEYS[1], #items, -1)
  redis.call('RPUSH', KEYS[4], unpack(items))
end
return items
"""
)
# KEYS: leases; ARGV: drain id, lease seconds. Extends the lease unless it is gone.
RENEW_SCRIPT = (
    NOW
    + room("KEYS[1]")
    + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)
# KEYS: delayed, leases, claimed; ARGV: drain id, delay. Puts what a failing drain held
# back as retries due in delay seconds, and ends its lease.
ABANDON_SCRIPT = (
    NOW
    + room("KEYS[1]")
    + """
for _, item in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), item)
end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
"""
)
# KEYS: ready, delayed, leases; ARGV: drain id. Ends the drain's lease unless work is
# waiting: checked in the same step, so an item pushed meanwhile is never left alone.
RELEASE_SCRIPT = (
    NOW
    + """
if redis.call('LLEN', KEYS[1]) > 0 or redis.call('ZCOUNT', KEYS[2], '-inf', now) > 0 then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""
)
# KEYS: ready, delayed, leases; ARGV: claimed key prefix, max drains, lease seconds, new
# drain id. Gives back what dead drains held, makes due retries ready, and returns a new
# drain id when work waits and a drain should start.
WAKE_SCRIPT = (
    NOW
    + room("KEYS[3]")
    + _GIVE_BACK
    + _START
    + """
for _, drain in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  give_back(KEYS[1], ARGV[1] .. drain)
  redis.call('ZREM', KEYS[3], drain)
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for _, item in ipairs(due) do
  redis.call('ZREM', KEYS[2], item)
  redis.call('RPUSH', KEYS[1], item)
end
if redis.call('LLEN', KEYS[1]) == 0 then return false end
return start(KEYS[1], KEYS[3], ARGV[2], ARGV[3], ARGV[4])
"""
)


# KEYS: leases; ARGV: lease seconds, new drain id. Takes a lease when no drain runs.
LEASE_IF_IDLE_SCRIPT = (
    NOW
    + room("KEYS[1]")
    + """
if redis.call('ZCOUNT', KEYS[1], now, '+inf') > 0 then return false end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return ARGV[2]
"""
)


def kind(queue: str) -> str:
    """The queue a lane belongs to (``in`` for ``in:<handler>``); a queue's is its own."""
    return queue.partition(":")[0]


def _base(queue: str) -> str:
    # Every key of a queue is in one Redis Cluster hash slot, the queue's.
    return f"{conf.KEY_PREFIX}queue:{slot(queue)}:"


def _keys(queue: str) -> tuple[str, str, str]:
    base = _base(queue)
    return f"{base}ready", f"{base}delayed", f"{base}leases"


def claimed_key(queue: str, drain_id: str) -> str:
    return f"{_base(queue)}claimed:{drain_id}"


def leases_key(queue: str) -> str:
    return _keys(queue)[2]


class Lease:
    """A drain's hold on what it claimed from ``queue``, under the id ``id``.

    Processing a batch calls ``keep_alive()`` before each step that may take a while (a
    POST, a handler): a long batch must not look like a dead drain's.
    """

    def __init__(self, queue: str, id: str) -> None:
        self.queue = queue
        self.id = id
        self.renew_every = conf.LEASE_SECONDS / 4
        self.renewed = time.monotonic()

    def keep_alive(self) -> None:
        """Renew the lease once a quarter of it has passed; raises LeaseLost if it is gone."""
        if time.monotonic() - self.renewed > self.renew_every:
            renew(self.queue, self.id)
            self.renewed = time.monotonic()


def encode(item: Item) -> str:
    return json.dumps(item, separators=(",", ":"))


_id_prefix = PerProcess(lambda: uuid.uuid4().hex[:16])
_id_count = itertools.count()


def new_id() -> str:
    """A unique id for a drain's lease or a handler's claim.

    Only unique, not secret: a random prefix per process and a count spare the system
    call of uuid4() on every push, which is slow on an idle machine.
    """
    return f"{_id_prefix()}{next(_id_count):x}"


def push(queue: str, items: Sequence[Item]) -> str | None:
    """Append ``items`` atomically (all or none); returns a drain id to start, if one should.

    One should when none runs, or when the backlog outgrows the running ones (see
    BACKLOG_PER_DRAIN), up to MAX_DRAINS. The lease is already taken for that id: the
    caller sends ``toot.drain`` with it (``toot.engine.drain.enqueue`` does both).
    """
    return push_encoded(queue, [encode(item) for item in items])


def push_encoded(queue: str, items: Sequence[str]) -> str | None:
    """``push`` for items already encoded: publish() encodes its event only once."""
    return _push(queue, items)


def _push(queue: str, items: Sequence[str]) -> str | None:
    args = [conf.MAX_DRAINS, conf.LEASE_SECONDS, new_id(), *items]
    if conf.REDIS_WAIT_REPLICAS:  # a push is where work enters toot: kept only once replicated
        [drain] = run_scripts([(PUSH_SCRIPT, _keys(queue)[::2], args)], replicated=True)
        return _optional_text(drain)
    return _optional_text(run_script(PUSH_SCRIPT, _keys(queue)[::2], args))


# A process adds a lane to the set that lanes() reads once per this many seconds: the set
# is never emptied, so the first time is enough but after Redis lost its data.
REGISTER_SECONDS = 60.0
_registered: PerProcess[dict[str, float]] = PerProcess(dict)


def push_many(pushes: Mapping[str, Sequence[str]]) -> dict[str, str | None]:
    """``push_encoded`` onto several lanes in one round trip; the drain id to start, if any,
    of each.

    A pipeline, not a transaction: each lane's items are all or none, but a failure may
    leave some lanes pushed and others not, which the caller's retry pushes again. Every
    lane joins the set that ``lanes()`` reads, for the relay to wake: with the push when
    this process has not added it for REGISTER_SECONDS, after it when the push starts a
    drain (whose work the relay must find if its worker dies). The common case, one lane
    with a drain running, is a single script call.
    """
    now, registered = time.monotonic(), _registered()
    new = [name for name in pushes if now - registered.get(name, -math.inf) >= REGISTER_SECONDS]
    if len(pushes) == 1 and not new:
        [(name, items)] = pushes.items()
        drains = {name: _push(name, items)}
    else:
        calls = [
            (PUSH_SCRIPT, _keys(name)[::2], [conf.MAX_DRAINS, conf.LEASE_SECONDS, new_id(), *items])
            for name, items in pushes.items()
        ]
        results = run_scripts(
            calls, before=lambda pipe: new and pipe.sadd(_lanes_key(), *new), replicated=True
        )
        drains = {name: _optional_text(drain) for name, drain in zip(pushes, results, strict=True)}
        registered.update(dict.fromkeys(new, now))
    started = [name for name, drain in drains.items() if drain is not None and name not in new]
    if started:
        get_redis().sadd(_lanes_key(), *started)
    return drains


# other_lanes_waiting() reads the lanes' set again after this many seconds: a drain asks
# each time its lane is empty, and a lane new since then has a drain of its own started.
KNOWN_LANES_SECONDS = 10.0
_known_lanes: PerProcess[dict[str, tuple[float, list[str]]]] = PerProcess(dict)


def other_lanes_waiting(name: str) -> bool:
    """Whether a lane of ``name``'s queue, other than ``name``, has items ready; False for
    a queue without lanes."""
    if kind(name) == name:
        return False
    known, key, now = _known_lanes(), _lanes_key(), time.monotonic()
    read_at, every = known.get(key, (-math.inf, []))
    if now - read_at > KNOWN_LANES_SECONDS:
        every = lanes()
        known[key] = now, every
    others = [lane for lane in every if lane != name and kind(lane) == kind(name)]
    if not others:
        return False
    with get_redis().pipeline(transaction=False) as pipe:
        for lane in others:
            pipe.llen(_keys(lane)[0])
        return any(pipe.execute())


def lanes() -> list[str]:
    """Every lane pushed to under this KEY_PREFIX: those the relay wakes, besides QUEUES."""
    return sorted(as_text(name) for name in get_redis().smembers(_lanes_key()))


def _lanes_key() -> str:
    # Never emptied: a lane's name is a handler's, so the set stays as small as the
    # handlers a project ever had, and a lane found empty costs the relay one call.
    return f"{conf.KEY_PREFIX}queue:lanes"


def claim(
    queue: str, drain_id: str, limit: int, retries: Sequence[Retry] = (), *, first: bool = False
) -> list[dict[str, Any]]:
    """End the drain's last batch and claim the next, of up to ``limit`` items, in one step.

    The last batch's items are dropped and its ``retries`` (item, delay) scheduled
    together, so that a crash leaves either the whole batch claimed or none of it. A run's
    ``first`` claim drops nothing: a message run twice (a project's ``acks_late``, a
    broker's redelivery) finds what the dead run held and takes it over.
    """
    keys = [*_keys(queue), claimed_key(queue, drain_id)]
    args: list[Any] = [drain_id, limit, conf.LEASE_SECONDS, int(first)]
    for item, delay in retries:
        args += [encode(item), delay]
    items = run_script(CLAIM_SCRIPT, keys, args)
    if items is None:
        raise LeaseLost
    return [json.loads(item) for item in items]


def wait(queue: str, drain_id: str, timeout: float) -> dict[str, Any] | None:
    """Block up to ``timeout`` seconds for one item, claimed for the drain as it arrives.

    Call it only after ``claim`` found nothing: the drain holds no other item then.
    """
    ready, claimed = _keys(queue)[0], claimed_key(queue, drain_id)
    # Redis takes a fractional timeout since 6.0; redis-py's stubs still say int.
    item = get_redis().blmove(ready, claimed, timeout, "LEFT", "RIGHT")  # type: ignore[arg-type]
    return None if item is None else json.loads(item)


def renew(queue: str, drain_id: str) -> None:
    """Extend the drain's lease: a long batch must not look like a dead drain's."""
    if not run_script(RENEW_SCRIPT, _keys(queue)[2:], [drain_id, conf.LEASE_SECONDS]):
        raise LeaseLost


def release(queue: str, drain_id: str) -> bool:
    """End the drain's lease; False (the lease kept) when work is waiting."""
    return bool(run_script(RELEASE_SCRIPT, _keys(queue), [drain_id]))


def abandon(queue: str, drain_id: str, delay: float) -> None:
    """End a failing drain: what it held is tried again in ``delay`` seconds, by any drain.

    Its lease ends at once, so that new items do not wait for it to run out.
    """
    _, delayed, leases = _keys(queue)
    run_script(ABANDON_SCRIPT, [delayed, leases, claimed_key(queue, drain_id)], [drain_id, delay])


def forget(queue: str, drain_id: str) -> None:
    """Give up a lease whose drain could not be started, so that the relay may start one."""
    get_redis().zrem(_keys(queue)[2], drain_id)


def wake(queue: str) -> str | None:
    """Recover dead drains' items and due retries; returns a drain id to start, if one should."""
    args = [claimed_key(queue, ""), conf.MAX_DRAINS, conf.LEASE_SECONDS, new_id()]
    return _optional_text(run_script(WAKE_SCRIPT, _keys(queue), args))


def lease_if_idle(queue: str) -> str | None:
    """A drain id to start when no drain of ``queue`` runs, for work kept elsewhere (the
    publisher's lanes); its lease is taken."""
    args = [conf.LEASE_SECONDS, new_id()]
    return _optional_text(run_script(LEASE_IF_IDLE_SCRIPT, [leases_key(queue)], args))


def pending(queue: str) -> int:
    """Items in ``queue``: ready, held by drains, or waiting for a retry."""
    found = depth(queue)
    return found.ready + found.held + found.retries


@dataclass
class Depth:
    """What a queue holds: items ready, held by running drains, waiting for a retry (and
    when the first is due, Redis' time), and its drains."""

    ready: int
    held: int
    retries: int
    next_due: float | None
    drains: int


def depth(queue: str) -> Depth:
    """``queue``'s depth, in two round trips."""
    ready, delayed, leases = _keys(queue)
    client = get_redis()
    drains = [as_text(drain) for drain in client.zrange(leases, 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(ready)
        pipe.zcard(delayed)
        pipe.zrange(delayed, 0, 0, withscores=True)
        for drain in drains:
            pipe.llen(claimed_key(queue, drain))
        waiting, retries, first, *held = pipe.execute()
    next_due = float(first[0][1]) if first else None
    return Depth(int(waiting), int(sum(held)), int(retries), next_due, len(drains))


def retry_now(queue: str, channel: str | None = None) -> int:
    """Make every retry waiting in ``queue``, or those of events on ``channel``, due now;
    how many. The relay's next step moves them to ``ready``, 1,000 a step."""
    if channel is not None:
        return _retry_channel_now(queue, channel)
    count = 0
    while True:
        found = int(run_script(RETRY_NOW_SCRIPT, [_keys(queue)[1]], [RETRY_NOW_STEP]))
        count += found
        if found < RETRY_NOW_STEP:
            return count


def _retry_channel_now(queue: str, channel: str) -> int:
    delayed = _keys(queue)[1]
    client = get_redis()
    items = [
        item
        for item in map(as_text, client.zrange(delayed, 0, -1))
        if json.loads(item).get("event", {}).get("channel") == channel
    ]
    seconds, micro = client.time()
    now = seconds + micro / 1_000_000
    count = 0
    for start in range(0, len(items), RETRY_NOW_STEP):  # a command stays short
        chunk = items[start : start + RETRY_NOW_STEP]
        # XX: one a drain claimed meanwhile is not put back.
        count += int(client.zadd(delayed, dict.fromkeys(chunk, now), xx=True, ch=True) or 0)
    return count


# Retries made due per script call: a call stays short whatever waits.
RETRY_NOW_STEP = 1000
# KEYS: delayed; ARGV: most. Makes up to most of the items not yet due, due now.
RETRY_NOW_SCRIPT = (
    NOW
    + """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'LIMIT', 0, ARGV[1])
for _, item in ipairs(items) do redis.call('ZADD', KEYS[1], 'XX', now, item) end
return #items
"""
)


def _optional_text(value: Any) -> str | None:
    return None if value is None else as_text(value)
