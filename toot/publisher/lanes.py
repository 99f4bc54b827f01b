"""A lane per callback URL: deliveries wait in Redis at each subscriber's own pace.

A drain used to send a claimed batch to every URL and wait for the slowest before it
claimed the next: one subscriber answering after a second held every other back. Now the
``out`` queue's drain only fans events out, into a list per URL, and sender threads
(``toot.publisher.senders``) take work from whichever URL is due, a claim at a time:
a slow URL keeps only its own threads waiting. Under ``KEY_PREFIX + "lanes:{out}:"``:

- ``ready:<url>``: a LIST of what waits for the URL, oldest first: an event as its wire
  JSON after ``S`` (sent alone) or ``B`` (in batches), or a failed delivery's retry as a
  JSON object;
- ``due``: a ZSET of URLs scored by when each may next be claimed from: now, or when its
  circuit may be probed, or when its rate limit allows. A URL at its in-flight limit is
  left out until a request of its own returns;
- ``inflight``: a HASH of the requests in flight per URL, across every worker;
- ``delayed``: a ZSET of retries by when they are due;
- ``hosts``: a ZSET of sender pools (one per worker process) scored by when their lease
  ends; ``held:<host>``: a HASH of what each pool's threads hold, a claim each, which the
  relay puts back at the front of its lane once the pool's lease has ended;
- ``state:<url>``: the URL's circuit breaker (``mode``: absent when closed, ``open``,
  ``probing`` or ``disabled``; ``failures`` in a row; failing ``since``; open ``until``;
  the in-flight ``limit`` while it ramps up after closing);
- ``rates``: a HASH of the events per second each URL asked for when it registered;
  ``tat:<url>``: when its rate limit next allows an event (GCRA);
- ``batch``: a HASH of the URLs that asked for batches, whose claims take more at once.

Every key of a lane shares the ``{out}`` hash tag: one Redis Cluster slot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from toot.conf import conf
from toot.engine.connection import as_text, get_redis, run_script
from toot.engine.queue import NOW, encode

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
# disabled: the relay makes dead letters of what waits for it).
PUSH_SCRIPT = (
    NOW
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

# Shared by CLAIM_SCRIPT and WAKE_SCRIPT: b is the key base.
_LANE = """
local function make_due(b, url, at)
  if redis.call('LLEN', b .. 'ready:' .. url) > 0 then
    redis.call('ZADD', b .. 'due', 'NX', at, url)
  end
end
local function move_due_retries(b)
  local due = redis.call('ZRANGEBYSCORE', b .. 'delayed', '-inf', now, 'LIMIT', 0, 100)
  for _, item in ipairs(due) do
    redis.call('ZREM', b .. 'delayed', item)
    local url = cjson.decode(item)['delivery']['url']
    redis.call('RPUSH', b .. 'ready:' .. url, item)
    make_due(b, url, now)
  end
end
"""

# KEYS: hosts, held:<host>; ARGV: key base, host, lease seconds, max in flight, items per
# single claim, items per batch claim, default rate, failures that open a circuit,
# seconds it stays open, seconds of failing that disable the URL, whether to claim ("1"),
# the new claim's id, then the claim that ended ("" if none), its URL, how it went (OK,
# FAILED or NEUTRAL), then (retry item, delay) pairs.
#
# Ends the thread's last claim (its retries scheduled, its URL's breaker updated), renews
# the pool's lease, makes due retries ready and claims from the first due URL that may
# be sent to. Returns {transition of the ended claim's URL or "", "1" if the new claim is
# a probe, seconds until a URL is due ("" if none), URL, items...}; false once the pool's
# lease is gone (the relay gave what it held to others).
CLAIM_SCRIPT = (
    NOW
    + _LANE
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
  for i = 16, #ARGV, 2 do
    redis.call('ZADD', b .. 'delayed', now + tonumber(ARGV[i + 1]), ARGV[i])
  end
  local state = b .. 'state:' .. url
  local mode = redis.call('HGET', state, 'mode')
  if ARGV[15] == 'ok' then
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

# KEYS: hosts; ARGV: host, lease seconds. Takes or renews a pool's lease.
RENEW_SCRIPT = (
    NOW
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
    return f"{conf.KEY_PREFIX}lanes:{{out}}:"


@dataclass
class Claim:
    """What a sender thread took from one URL's lane, and how it went."""

    id: str
    url: str
    items: list[str]
    probe: bool = False
    outcome: str = NEUTRAL
    retries: Sequence[tuple[Any, float]] = ()


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
        args += ["", "", NEUTRAL]
    else:
        args += [ended.id, ended.url, ended.outcome]
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
        pipe.zcard(b + "delayed")
        replies = pipe.execute()
    held = sum(as_text(v).count(SEP) for values in replies[len(keys) : -1] for v in values)
    return int(sum(replies[: len(keys)]) + held + replies[-1])
