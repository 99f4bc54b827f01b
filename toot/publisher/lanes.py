"""A lane per callback URL: deliveries wait in Redis at each subscriber's own pace.

A drain used to send a claimed batch to every URL and wait for the slowest before it
claimed the next: one subscriber answering after a second held every other back. Now the
``out`` queue's drain only fans events out, into a list per URL, and sender threads
(``toot.publisher.senders``) take work from whichever URL is due, a claim at a time:
a slow URL keeps only its own threads waiting. Under
``KEY_PREFIX + "lanes:{<KEY_PREFIX>out}:"``:

- ``ready:<url>``: a LIST of what waits for the URL, oldest first: an event as its wire
  JSON after ``S`` (sent alone) or ``B`` (in batches), with its publish's traceparent
  between the two when it was traced (toot.tracing), or a failed delivery's retry as a
  JSON object;
- ``due``: a ZSET of URLs scored by when each may next be claimed from: now, or when its
  circuit may be probed, or when its rate limit allows. A URL at its in-flight limit is
  left out until a request of its own returns;
- ``inflight``: a HASH of the requests in flight per URL, across every worker;
- ``delayed:<url>``: a ZSET of the URL's failed deliveries waiting for their retry, by
  when each is due; ``delayed``: a ZSET of the URLs that have some, by when the first is
  due; ``hurry``: a SET of the URLs whose retries are all due at once (``retry_now``, or
  the URL answering again after failing), brought into the lane a few at a time;
- ``hosts``: a ZSET of sender pools (one per worker process) scored by when their lease
  ends; ``held:<host>``: a HASH of what each pool's threads hold, a claim each, which the
  relay puts back at the front of its lane once the pool's lease has ended;
- ``state:<url>``: the URL's circuit breaker (``mode``: absent when closed, ``open``,
  ``probing`` or ``disabled``; ``failures`` in a row; failing ``since``; open ``until``;
  the in-flight ``limit`` while it ramps up after closing);
- ``rates``: a HASH of the events per second each URL asked for when it registered;
  ``tat:<url>``: when its rate limit next allows an event (GCRA);
- ``batch``: a HASH of the URLs that asked for batches, whose claims take more at once;
- ``health:<url>``: when the URL last answered (``ok``), last failed (``failed``) and how
  (``error``), for ``toot.status``; kept 30 days after its last delivery, or until the
  URL's last subscription is removed;
- ``minute:<minute>``: a HASH of deliveries ``delivered`` and ``failed`` in that minute
  (Redis' time, in minutes since the epoch), kept for an hour.

Every key of a lane shares the ``out`` queue's hash tag (``connection.slot``), and so do the
subscription store's: a script may read any of them on a Redis Cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from toot.conf import conf
from toot.engine.connection import as_text, get_redis, run_script, slot
from toot.engine.queue import NOW, OUT, encode, room

SINGLE = "S"  # prefixes an event sent alone
BATCHED = "B"  # prefixes an event sent in batches
# A claim of a URL that takes events one per request takes this many: sent one after
# another by one thread, so that a backlog costs a Redis round trip per few deliveries.
SINGLE_PER_CLAIM = 10
# In the scripts: a claim makes up to 100 due retries ready and looks at up to 20 due
# URLs; a rate-limited URL's claim takes the events of a tenth of a second of its rate, at
# least one.
# What a claim's held entry joins its URL and items with: JSON text never holds one.
SEP = "\n"

# Transitions of a URL's circuit breaker that a claim reports, to be logged.
OPENED, CLOSED, DISABLED = "opened", "closed", "disabled"
# How a claim's requests went, for the breaker: every delivery answered by the URL
# (a 2xx, or a 4xx of that body alone), or a failure of the URL itself.
OK, FAILED, NEUTRAL = "ok", "failed", "neutral"

# KEYS: due; ARGV: key base, then (url, batch flag, count, items...) per URL. Appends
# each URL's items to its lane and makes the lane due if it was not (and the URL is not
# disabled: the relay makes dead letters of what waits for it). It runs on a full Redis
# too (queue.room): the fan-out moves work along, and only the deliveries that follow
# make room; refused, the out queue would hold the last of the memory for good.
PUSH_SCRIPT = (
    NOW
    + room("KEYS[1]")
    + """
local base, i = ARGV[1], 2
while i <= #ARGV do
  local url, count = ARGV[i], tonumber(ARGV[i + 2])
  if ARGV[i + 1] == '1' then redis.call('HSET', base .. 'batch', url, '1') end
  redis.call('RPUSH', base .. 'ready:' .. url, unpack(ARGV, i + 3, i + 2 + count))
  if redis.call('SISMEMBER', base .. 'disabled', url) == 0 then
    redis.call('ZADD', KEYS[1], 'NX', now, url)
  end
  i = i + 3 + count
end
"""
)

# Retries come into a URL's lane this many at a time, and only while fewer wait there:
# the lane's in-flight limit (and a closing circuit's ramp) paces what is sent, and the
# lane never holds a large backlog that new events wait behind, however many retries were
# made due at once (a hurried URL's, a channel's by retry_channel_now).
RETRY_STEP = 100
# A URL whose lane is full, with retries to move, is looked at again after this long.
RETRY_PAUSE = 0.5
# Per-minute counters are kept this long (an hour and a few minutes).
MINUTES_KEPT = 65
# A URL's health record is kept this long after its last delivery (30 days), and dropped
# at once when its last subscription is removed.
HEALTH_KEPT = 30 * 24 * 3600

# Shared by CLAIM_SCRIPT, WAKE_SCRIPT and RETRY_NOW_SCRIPT: b is the key base.
_LANE = f"""
local function make_due(b, url, at)
  if redis.call('LLEN', b .. 'ready:' .. url) > 0 then
    redis.call('ZADD', b .. 'due', 'NX', at, url)
  end
end
-- Moves up to most of url's retries into its lane, those due or, once hurried, any;
-- returns how many.
local function move_retries(b, url, most)
  local key, ready = b .. 'delayed:' .. url, b .. 'ready:' .. url
  local hurried = redis.call('SISMEMBER', b .. 'hurry', url) == 1
  local items, room = {{}}, {RETRY_STEP} - redis.call('LLEN', ready)
  if room > 0 and hurried then
    items = redis.call('ZRANGE', key, 0, math.min(room, most) - 1)
  elseif room > 0 then
    items = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, math.min(room, most))
  end
  if #items > 0 then
    redis.call('ZREM', key, unpack(items))
    redis.call('RPUSH', ready, unpack(items))
    make_due(b, url, now)
  end
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if not first[2] then
    redis.call('ZREM', b .. 'delayed', url)
    redis.call('SREM', b .. 'hurry', url)
  elseif hurried then
    redis.call('ZADD', b .. 'delayed', #items > 0 and now or now + {RETRY_PAUSE}, url)
  elseif room <= 0 and tonumber(first[2]) <= now then
    redis.call('ZADD', b .. 'delayed', now + {RETRY_PAUSE}, url)
  else
    redis.call('ZADD', b .. 'delayed', first[2], url)
  end
  return #items
end
local function move_due_retries(b)
  local most = 100
  local due = redis.call('ZRANGEBYSCORE', b .. 'delayed', '-inf', now, 'LIMIT', 0, 20)
  for _, member in ipairs(due) do
    if string.sub(member, 1, 1) == '{{' then
      -- A retry itself, as a toot from before the URLs' own sets scheduled it.
      redis.call('ZREM', b .. 'delayed', member)
      local url = cjson.decode(member)['delivery']['url']
      redis.call('RPUSH', b .. 'ready:' .. url, member)
      make_due(b, url, now)
      most = most - 1
    else
      most = most - move_retries(b, member, most)
    end
    if most <= 0 then break end
  end
end
-- Makes every retry of url due now, to come into its lane a few at a time.
local function hurry(b, url)
  if redis.call('EXISTS', b .. 'delayed:' .. url) == 1 then
    redis.call('SADD', b .. 'hurry', url)
    redis.call('ZADD', b .. 'delayed', now, url)
    return 1
  end
  return 0
end
"""

# KEYS: hosts, held:<host>; ARGV: key base, host, lease seconds, max in flight, items per
# single claim, items per batch claim, default rate, failures that open a circuit,
# seconds it stays open, seconds of failing that disable the URL, whether to claim ("1"),
# the new claim's id, then the claim that ended ("" if none), its URL, how it went (OK,
# FAILED or NEUTRAL), its last failure ("" if none), its deliveries delivered and failed,
# then (retry item, delay) pairs.
#
# Ends the thread's last claim (its retries scheduled, its URL's breaker, health and the
# minute's counters updated; a URL that answers again after failing has its retries
# hurried), renews
# the pool's lease, makes due retries ready and claims from the first due URL that may
# be sent to. Returns {transition of the ended claim's URL or "", "1" if the new claim is
# a probe, seconds until a URL is due ("" if none), URL, items...}; false once the pool's
# lease is gone (the relay gave what it held to others).
CLAIM_SCRIPT = (
    NOW
    + room("KEYS[1]")  # a claim must run on a full Redis: it ends one, which makes room
    + _LANE
    + f"local MINUTES_KEPT, HEALTH_KEPT = {MINUTES_KEPT * 60}, {HEALTH_KEPT}\n"
    + """
local b, host = ARGV[1], ARGV[2]
local leased = redis.call('ZSCORE', KEYS[1], host)
if not leased or tonumber(leased) < now then
  return false
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), host)
local max_in_flight = tonumber(ARGV[4])
local transition = ''
local ended, url = ARGV[13], ARGV[14]
if ended ~= '' and redis.call('HDEL', KEYS[2], ended) == 1 then
  if redis.call('HINCRBY', b .. 'inflight', url, -1) <= 0 then
    redis.call('HDEL', b .. 'inflight', url)
  end
  for i = 19, #ARGV, 2 do
    local at = now + tonumber(ARGV[i + 1])
    redis.call('ZADD', b .. 'delayed:' .. url, at, ARGV[i])
    redis.call('ZADD', b .. 'delayed', 'LT', at, url)
  end
  local minute = b .. 'minute:' .. math.floor(now / 60)
  if ARGV[17] ~= '0' then redis.call('HINCRBY', minute, 'delivered', ARGV[17]) end
  if ARGV[18] ~= '0' then redis.call('HINCRBY', minute, 'failed', ARGV[18]) end
  if ARGV[17] ~= '0' or ARGV[18] ~= '0' then redis.call('EXPIRE', minute, MINUTES_KEPT) end
  local state, health = b .. 'state:' .. url, b .. 'health:' .. url
  local mode = redis.call('HGET', state, 'mode')
  if ARGV[16] ~= '' then redis.call('HSET', health, 'failed', now, 'error', ARGV[16]) end
  if ARGV[15] == 'ok' then redis.call('HSET', health, 'ok', now) end
  if ARGV[16] ~= '' or ARGV[15] == 'ok' then redis.call('EXPIRE', health, HEALTH_KEPT) end
  if ARGV[15] == 'ok' then
    if mode == 'probing' or redis.call('HEXISTS', state, 'failures') == 1 then hurry(b, url) end
    if mode == 'probing' then
      redis.call('HDEL', state, 'mode', 'until', 'failures', 'since')
      redis.call('HSET', state, 'limit', 1)
      transition = 'closed'
    elseif not mode then
      redis.call('HDEL', state, 'failures', 'since')
      local limit = tonumber(redis.call('HGET', state, 'limit'))
      if limit and limit + 1 >= max_in_flight then
        redis.call('HDEL', state, 'limit')
      elseif limit then
        redis.call('HSET', state, 'limit', limit + 1)
      end
    end
  elseif ARGV[15] == 'failed' and mode ~= 'disabled' then
    local failures = redis.call('HINCRBY', state, 'failures', 1)
    local since = tonumber(redis.call('HGET', state, 'since'))
    if not since then
      since = now
      redis.call('HSET', state, 'since', now)
    end
    if now - since >= tonumber(ARGV[10]) then
      redis.call('HSET', state, 'mode', 'disabled')
      redis.call('HDEL', state, 'until', 'limit')
      redis.call('ZREM', b .. 'due', url)
      redis.call('SADD', b .. 'disabled', url)
      transition = 'disabled'
    elseif mode == 'probing' or (mode ~= 'open' and failures >= tonumber(ARGV[8])) then
      local reopen = now + tonumber(ARGV[9])
      redis.call('HSET', state, 'mode', 'open', 'until', reopen)
      redis.call('HDEL', state, 'limit')
      redis.call('ZADD', b .. 'due', reopen, url)
      transition = 'opened'
    end
  end
  if transition ~= 'opened' and transition ~= 'disabled' then make_due(b, url, now) end
end
move_due_retries(b)
if ARGV[11] ~= '1' then return {transition, '0', ''} end

local function try(url)
  local ready, state = b .. 'ready:' .. url, b .. 'state:' .. url
  local length = redis.call('LLEN', ready)
  if length == 0 then
    redis.call('ZREM', b .. 'due', url)
    return nil
  end
  local fields = redis.call('HMGET', state, 'mode', 'until', 'limit')
  local mode, probe = fields[1], false
  if mode == 'disabled' or mode == 'probing' then
    redis.call('ZREM', b .. 'due', url)  -- the probe's end makes it due again
    return nil
  elseif mode == 'open' then
    if (tonumber(fields[2]) or 0) > now then
      redis.call('ZADD', b .. 'due', fields[2], url)
      return nil
    end
    probe = true
  end
  local limit = probe and 1 or (tonumber(fields[3]) or max_in_flight)
  local in_flight = tonumber(redis.call('HGET', b .. 'inflight', url)) or 0
  if in_flight >= limit then
    redis.call('ZREM', b .. 'due', url)  -- the end of one of its claims makes it due again
    return nil
  end
  local take = tonumber(ARGV[5])
  if redis.call('HGET', b .. 'batch', url) then take = tonumber(ARGV[6]) end
  if probe then take = 1 end
  local next_due = now
  local rate = tonumber(redis.call('HGET', b .. 'rates', url)) or tonumber(ARGV[7])
  if rate > 0 then
    local tat = tonumber(redis.call('GET', b .. 'tat:' .. url)) or now
    if tat > now then
      redis.call('ZADD', b .. 'due', tat, url)
      return nil
    end
    take = math.min(take, math.max(1, math.floor(rate * 0.1)))
  end
  if in_flight > 0 and length < take then
    -- A request of its own is out: what waits joins the next claim, made as it ends,
    -- rather than go in a smaller one beside it. More go at once only for a backlog.
    redis.call('ZREM', b .. 'due', url)
    return nil
  end
  take = math.min(take, length)
  if rate > 0 then
    next_due = now + take / rate
    redis.call('SET', b .. 'tat:' .. url, next_due, 'EX', 3600)
  end
  local items = redis.call('LRANGE', ready, 0, take - 1)
  redis.call('LTRIM', ready, take, -1)
  redis.call('HINCRBY', b .. 'inflight', url, 1)
  if probe then redis.call('HSET', state, 'mode', 'probing') end
  redis.call('HSET', KEYS[2], ARGV[12], url .. '\\n' .. table.concat(items, '\\n'))
  if probe or length == take or in_flight + 1 >= limit then
    redis.call('ZREM', b .. 'due', url)
  else
    redis.call('ZADD', b .. 'due', next_due, url)  -- behind the URLs due before it
  end
  local reply = {transition, probe and '1' or '0', '', url}
  for _, item in ipairs(items) do reply[#reply + 1] = item end
  return reply
end

for _, url in ipairs(redis.call('ZRANGEBYSCORE', b .. 'due', '-inf', now, 'LIMIT', 0, 20)) do
  local reply = try(url)
  if reply then return reply end
end
local first = redis.call('ZRANGE', b .. 'due', 0, 0, 'WITHSCORES')
return {transition, '0', first[2] and tostring(math.max(0, first[2] - now)) or ''}
"""
)

# KEYS: hosts; ARGV: key base. Puts back at the front of their lanes what the pools whose
# lease ended held (a probe among it is made again), makes due retries ready, and returns
# the seconds until the first lane is due (0: now), or false if none waits.
WAKE_SCRIPT = (
    NOW
    + room("KEYS[1]")
    + _LANE
    + """
local b = ARGV[1]
for _, host in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  local held = redis.call('HGETALL', b .. 'held:' .. host)
  for i = 2, #held, 2 do
    local parts = {}
    for part in string.gmatch(held[i], '[^\\n]+') do parts[#parts + 1] = part end
    local url = parts[1]
    for j = #parts, 2, -1 do redis.call('LPUSH', b .. 'ready:' .. url, parts[j]) end
    if redis.call('HINCRBY', b .. 'inflight', url, -1) <= 0 then
      redis.call('HDEL', b .. 'inflight', url)
    end
    local state = b .. 'state:' .. url
    if redis.call('HGET', state, 'mode') == 'probing' then
      redis.call('HSET', state, 'mode', 'open', 'until', now)
    end
    make_due(b, url, now)
  end
  redis.call('DEL', b .. 'held:' .. host)
  redis.call('ZREM', KEYS[1], host)
end
move_due_retries(b)
local first = redis.call('ZRANGE', b .. 'due', 0, 0, 'WITHSCORES')
if not first[2] then return false end
return tostring(math.max(0, first[2] - now))
"""
)

# KEYS: delayed; ARGV: key base, then URLs, or none for every URL with retries waiting.
# Hurries the URLs' retries (and makes the retries of a toot from before the URLs' own
# sets due now). Returns how many retries are hurried.
RETRY_NOW_SCRIPT = (
    NOW
    + _LANE
    + """
local b, urls, count = ARGV[1], {}, 0
if #ARGV == 1 then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if string.sub(member, 1, 1) == '{' then
      redis.call('ZADD', KEYS[1], now, member)
      count = count + 1
    else
      urls[#urls + 1] = member
    end
  end
else
  for i = 2, #ARGV do urls[#urls + 1] = ARGV[i] end
end
for _, url in ipairs(urls) do
  if hurry(b, url) == 1 then count = count + redis.call('ZCARD', b .. 'delayed:' .. url) end
end
return count
"""
)

# KEYS: delayed, delayed:<url>; ARGV: key base, url, items. Makes those of the items still
# waiting due now. Returns how many.
DUE_NOW_SCRIPT = (
    NOW
    + """
local count = 0
for i = 3, #ARGV do
  count = count + redis.call('ZADD', KEYS[2], 'XX', 'CH', now, ARGV[i])
end
if count > 0 then redis.call('ZADD', KEYS[1], 'LT', now, ARGV[2]) end
return count
"""
)

# KEYS: hosts; ARGV: host, lease seconds. Takes or renews a pool's lease.
RENEW_SCRIPT = (
    NOW
    + room("KEYS[1]")
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""
)

# KEYS: disabled; ARGV: key base, most items. Takes the waiting items of disabled URLs, to
# become dead letters. Returns {url, count, items..., url, count, items...}.
TAKE_DISABLED_SCRIPT = """
local b, most, reply = ARGV[1], tonumber(ARGV[2]), {}
for _, url in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local ready = b .. 'ready:' .. url
  local items = redis.call('LRANGE', ready, 0, most - 1)
  if #items > 0 then
    redis.call('LTRIM', ready, #items, -1)
    reply[#reply + 1] = url
    reply[#reply + 1] = #items
    for _, item in ipairs(items) do reply[#reply + 1] = item end
    most = most - #items
    if most <= 0 then break end
  end
end
return reply
"""


def base() -> str:
    return f"{conf.KEY_PREFIX}lanes:{slot(OUT)}:"


@dataclass
class Claim:
    """What a sender thread took from one URL's lane, and how it went."""

    id: str
    url: str
    items: list[str]
    probe: bool = False
    outcome: str = NEUTRAL
    retries: Sequence[tuple[Any, float]] = ()
    failure: str = ""  # the last failed delivery's status or error, for the URL's health
    delivered: int = 0  # deliveries answered 2xx, and failed, for the minute's counters
    failed: int = 0


@dataclass
class Reply:
    claim: Claim | None
    transition: str  # of the ended claim's URL
    wait: float | None  # seconds until a URL is due, when nothing was claimed


def push(lanes: dict[str, tuple[bool, list[str]]]) -> None:
    """Append to each URL's lane (batch flag, items) and make it due, in one step."""
    args: list[Any] = [base()]
    for url, (batch, items) in lanes.items():
        args += [url, int(batch), len(items), *items]
    run_script(PUSH_SCRIPT, [base() + "due"], args)


def claim(host: str, claim_id: str, ended: Claim | None, *, take: bool = True) -> Reply | None:
    """End ``ended`` and, if ``take``, claim the next due URL's work under ``claim_id``.

    None when the pool ``host``'s lease has ended: what it held is someone else's now.
    """
    b = base()
    args: list[Any] = [
        b,
        host,
        conf.LEASE_SECONDS,
        conf.MAX_IN_FLIGHT,
        SINGLE_PER_CLAIM,
        conf.BATCH_MAX_EVENTS,
        conf.CALLBACK_RATE_LIMIT or 0,
        conf.BREAKER_FAILURES,
        conf.BREAKER_SECONDS,
        conf.DISABLE_AFTER,
        "1" if take else "0",
        claim_id,
    ]
    if ended is None:
        args += ["", "", NEUTRAL, "", 0, 0]
    else:
        args += [ended.id, ended.url, ended.outcome, ended.failure, ended.delivered, ended.failed]
        for item, delay in ended.retries:
            args += [encode(item), delay]
    reply = run_script(CLAIM_SCRIPT, [b + "hosts", b + "held:" + host], args)
    if reply is None:
        return None
    transition, probe, wait = (as_text(part) for part in reply[:3])
    claimed = None
    if len(reply) > 3:
        items = [as_text(item) for item in reply[4:]]
        claimed = Claim(claim_id, as_text(reply[3]), items, probe == "1")
    return Reply(claimed, transition, float(wait) if wait else None)


def renew(host: str) -> None:
    """Take or renew the lease of the sender pool ``host``."""
    run_script(RENEW_SCRIPT, [base() + "hosts"], [host, conf.LEASE_SECONDS])


def release(host: str) -> None:
    """End the pool's lease once it holds nothing."""
    b = base()
    client = get_redis()
    if not client.hlen(b + "held:" + host):
        client.zrem(b + "hosts", host)


def wake() -> float | None:
    """Give back what dead pools held, make due retries ready; the seconds until the first
    lane is due (0: now), None if no lane has work."""
    due = run_script(WAKE_SCRIPT, [base() + "hosts"], [base()])
    return None if due is None else float(as_text(due))


def take_disabled(most: int = 1000) -> dict[str, list[str]]:
    """Up to ``most`` items waiting for disabled URLs, taken out of their lanes, by URL."""
    reply = [
        as_text(part)
        for part in run_script(TAKE_DISABLED_SCRIPT, [base() + "disabled"], [base(), most])
    ]
    taken: dict[str, list[str]] = {}
    i = 0
    while i < len(reply):
        url, count = reply[i], int(reply[i + 1])
        taken[url] = reply[i + 2 : i + 2 + count]
        i += 2 + count
    return taken


def set_rate(url: str, rate: float | None) -> None:
    """Record the events per second ``url`` asked for, or forget it (None)."""
    if rate is None:
        get_redis().hdel(base() + "rates", url)
    else:
        get_redis().hset(base() + "rates", url, repr(float(rate)))


def enable(url: str) -> bool:
    """Close ``url``'s circuit and let its lane flow again; False if it was not disabled."""
    b = base()
    client = get_redis()
    with client.pipeline() as pipe:
        pipe.srem(b + "disabled", url)
        pipe.delete(b + "state:" + url)
        pipe.llen(b + "ready:" + url)
        removed, _, waiting = pipe.execute()
    if waiting:
        client.zadd(b + "due", {url: 0}, nx=True)
    return bool(removed)


def disable(url: str) -> None:
    """Stop sending to ``url`` until ``enable``: what waits for it becomes dead letters."""
    b = base()
    with get_redis().pipeline() as pipe:
        pipe.hset(b + "state:" + url, "mode", "disabled")
        pipe.sadd(b + "disabled", url)
        pipe.zrem(b + "due", url)
        pipe.execute()


@dataclass
class LaneStatus:
    url: str
    waiting: int
    in_flight: int
    mode: str  # "closed", "open", "probing" or "disabled"
    failures: int
    failing_since: float | None
    open_until: float | None
    rate: float | None


def status(urls: Iterable[str] = ()) -> list[LaneStatus]:
    """Each lane's backlog and breaker: of ``urls``, or of every URL toot has sent to."""
    b = base()
    client = get_redis()
    known = set(urls) or {
        as_text(key)[len(b) + len("ready:") :] for key in client.scan_iter(match=b + "ready:*")
    } | {as_text(url) for url in client.hkeys(b + "inflight")} | {
        as_text(key)[len(b) + len("state:") :] for key in client.scan_iter(match=b + "state:*")
    }
    found = []
    for url in sorted(known):
        with client.pipeline(transaction=False) as pipe:
            pipe.llen(b + "ready:" + url)
            pipe.hget(b + "inflight", url)
            pipe.hgetall(b + "state:" + url)
            pipe.hget(b + "rates", url)
            waiting, in_flight, state, rate = pipe.execute()
        state = {as_text(k): as_text(v) for k, v in state.items()}
        found.append(
            LaneStatus(
                url,
                waiting,
                int(in_flight or 0),
                state.get("mode", "closed"),
                int(state.get("failures", 0)),
                float(state["since"]) if "since" in state else None,
                float(state["until"]) if "until" in state else None,
                float(rate) if rate is not None else conf.CALLBACK_RATE_LIMIT,
            )
        )
    return found


def retry_now(urls: Iterable[str] = ()) -> int:
    """Make the retries waiting for ``urls`` (or for every URL) due now; how many.

    They come into each URL's lane RETRY_STEP at a time, as it empties: a backlog of
    thousands does not go out faster than the URL's in-flight limit allows, nor hold back
    the events published meanwhile by more than a step.
    """
    b = base()
    return int(run_script(RETRY_NOW_SCRIPT, [b + "delayed"], [b, *urls]))


def retry_channel_now(channel: str) -> int:
    """Make the retries waiting of events on ``channel`` due now, for every URL; how many."""
    b = base()
    client = get_redis()
    count = 0
    for url in retrying_urls():
        key = b + "delayed:" + url
        items = [
            item
            for item in map(as_text, client.zrange(key, 0, -1))
            if json.loads(item)["delivery"]["events"][0]["channel"] == channel
        ]
        for start in range(0, len(items), 1000):  # a script call stays short
            chunk = items[start : start + 1000]
            count += int(run_script(DUE_NOW_SCRIPT, [b + "delayed", key], [b, url, *chunk]))
    return count


def retrying_urls() -> list[str]:
    """The URLs with retries waiting."""
    return index()[0]


@dataclass
class Retries:
    count: int
    # When the first is due (Redis' time), None if none waits; for a hurried URL, when
    # its next step comes into its lane.
    next_due: float | None


# KEYS: delayed (which routes the call to the lanes' slot on a Redis Cluster); ARGV: key
# base, "1" to add the URLs that are due, in flight or disabled. The URLs with retries
# waiting (and those others), and the count and first due time of the retries a toot from
# before the URLs' own sets kept in the index itself, as JSON.
INDEX_SCRIPT = """
local b, urls, seen, old, first = ARGV[1], {}, {}, 0, false
local function add(url)
  if not seen[url] then
    seen[url] = true
    urls[#urls + 1] = url
  end
end
local index = redis.call('ZRANGE', b .. 'delayed', 0, -1, 'WITHSCORES')
for i = 1, #index, 2 do
  if string.sub(index[i], 1, 1) == '{' then
    old = old + 1
    if not first then first = index[i + 1] end
  else
    add(index[i])
  end
end
if ARGV[2] == '1' then
  for _, url in ipairs(redis.call('ZRANGE', b .. 'due', 0, -1)) do add(url) end
  for _, url in ipairs(redis.call('HKEYS', b .. 'inflight')) do add(url) end
  for _, url in ipairs(redis.call('SMEMBERS', b .. 'disabled')) do add(url) end
end
return cjson.encode({old, first or '', #urls > 0 and urls or ''})
"""


def index(*, every: bool = False) -> tuple[list[str], Retries | None]:
    """The URLs with retries waiting (``every``: and those due, in flight or disabled),
    and the retries that a toot from before the URLs' own sets kept in the index itself
    (None if none); one call."""
    reply = run_script(INDEX_SCRIPT, [base() + "delayed"], [base(), "1" if every else "0"])
    old, first, urls = json.loads(as_text(reply))
    return list(urls or ()), Retries(old, float(first)) if old else None


def retries(urls: Iterable[str] | None = None) -> dict[str, Retries]:
    """The retries waiting for each of ``urls`` (default: every URL that has some, and
    ``""`` for those of a toot from before the URLs' sets)."""
    old = None
    if urls is None:
        urls, old = index()
    found = {record.url: record.retries for record in records(urls)}
    if old is not None:
        found[""] = old
    return found


# KEYS: delayed (to route the call); ARGV: key base, URLs. Each URL's lane, breaker, health
# and retries, as JSON: read in Redis, so that thousands of URLs cost a call, not a round
# trip's parsing per field.
RECORDS_SCRIPT = """
local b, out = ARGV[1], {}
for i = 2, #ARGV do
  local url = ARGV[i]
  local state = redis.call('HMGET', b .. 'state:' .. url, 'mode', 'failures', 'since', 'until')
  local health = redis.call('HMGET', b .. 'health:' .. url, 'ok', 'failed', 'error')
  local key = b .. 'delayed:' .. url
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  out[#out + 1] = {
    redis.call('LLEN', b .. 'ready:' .. url),
    tonumber(redis.call('HGET', b .. 'inflight', url)) or 0,
    state[1] or 'closed', tonumber(state[2]) or 0, state[3] or '', state[4] or '',
    redis.call('HGET', b .. 'rates', url) or '',
    health[1] or '', health[2] or '', health[3] or '',
    redis.call('ZCARD', key), first[2] or '',
    redis.call('SISMEMBER', b .. 'hurry', url) == 1
      and redis.call('ZSCORE', b .. 'delayed', url) or ''
  }
end
return cjson.encode(out)
"""
# URLs read per RECORDS_SCRIPT call: each call keeps Redis a few milliseconds.
RECORDS_STEP = 1000


def _seconds(text: str) -> float | None:
    return float(text) if text else None


@dataclass
class Record:
    """A URL's lane, circuit breaker, health and retries (times are Redis')."""

    url: str
    waiting: int
    in_flight: int
    mode: str  # "closed", "open", "probing" or "disabled"
    failures: int  # in a row
    failing_since: float | None
    open_until: float | None
    rate: float | None
    last_ok: float | None
    last_failed: float | None
    error: str
    retries: Retries


def records(urls: Iterable[str]) -> list[Record]:
    """Each of ``urls``' record, a script call per RECORDS_STEP URLs."""
    urls = list(urls)
    found = []
    for start in range(0, len(urls), RECORDS_STEP):
        chunk = urls[start : start + RECORDS_STEP]
        rows = json.loads(
            as_text(run_script(RECORDS_SCRIPT, [base() + "delayed"], [base(), *chunk]))
        )
        for url, row in zip(chunk, rows, strict=True):
            waiting, in_flight, mode, failures, since, until, rate, ok, failed, error = row[:10]
            count, first, hurried_at = row[10:]
            found.append(
                Record(
                    url,
                    int(waiting),
                    int(in_flight),
                    mode,
                    int(failures),
                    _seconds(since),
                    _seconds(until),
                    float(rate) if rate else conf.CALLBACK_RATE_LIMIT,
                    _seconds(ok),
                    _seconds(failed),
                    error,
                    Retries(int(count), _seconds(hurried_at or first)),
                )
            )
    return found


def health(urls: Iterable[str]) -> dict[str, dict[str, str]]:
    """Each URL's health record: ``ok`` and ``failed`` (Redis' time) and ``error``."""
    urls = list(urls)
    with get_redis().pipeline(transaction=False) as pipe:
        for url in urls:
            pipe.hgetall(base() + "health:" + url)
        replies = pipe.execute()
    return {
        url: {as_text(k): as_text(v) for k, v in reply.items()}
        for url, reply in zip(urls, replies, strict=True)
    }


def forget_health(url: str) -> None:
    """Drop the URL's health record (its last subscription was removed)."""
    get_redis().delete(base() + "health:" + url)


def minutes(count: int = 60) -> tuple[int, list[dict[str, int]]]:
    """The last ``count`` minutes' counters, oldest first, and the current minute (Redis'
    time, minutes since the epoch)."""
    client = get_redis()
    seconds, _ = client.time()
    current = int(seconds) // 60
    first = current - count + 1
    with client.pipeline(transaction=False) as pipe:
        for minute in range(first, current + 1):
            pipe.hgetall(f"{base()}minute:{minute}")
        replies = pipe.execute()
    return current, [{as_text(k): int(v) for k, v in reply.items()} for reply in replies]


def pending() -> int:
    """Deliveries waiting in every lane, held by senders, or waiting for a retry."""
    b = base()
    client = get_redis()
    keys = list(client.scan_iter(match=b + "ready:*"))
    hosts = [as_text(h) for h in client.zrange(b + "hosts", 0, -1)]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.llen(key)
        for host in hosts:
            pipe.hvals(b + "held:" + host)
        replies = pipe.execute()
    held = sum(as_text(v).count(SEP) for values in replies[len(keys) :] for v in values)
    waiting = sum(r.count for r in retries().values())
    return int(sum(replies[: len(keys)]) + held + waiting)
