"""The publisher's subscription store in Redis: one SET of callback URLs per channel.

Like the Ruby gem it keeps a SET per full channel; unlike it, it keeps an index SET of
channels instead of running ``KEYS``, and a SET per channel of the callback URLs that
asked for batches (the protocol's batches). Every key is under ``KEY_PREFIX +
"subscriptions:{<KEY_PREFIX>out}:"``, in the slot of the publisher's queue and lanes, so
that a script may read them on a Redis Cluster.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from toot.conf import conf
from toot.engine.connection import as_text, get_redis, run_script, slot
from toot.engine.queue import OUT
from toot.publisher import lanes

# Add and remove keep the channel index and the batch flags in step with the channel's
# set, atomically. KEYS: channel set, index, batch set; ARGV: url, channel, batch (0/1).
ADD_SCRIPT = """
local added = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
if ARGV[3] == '1' then
  redis.call('SADD', KEYS[3], ARGV[1])
else
  redis.call('SREM', KEYS[3], ARGV[1])
end
return added
"""
REMOVE_SCRIPT = """
local removed = redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('SCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return removed
"""


def _base() -> str:
    return f"{conf.KEY_PREFIX}subscriptions:{slot(OUT)}:"


def _channel_key(channel: str) -> str:
    return f"{_base()}urls:{channel}"


def _index_key() -> str:
    return f"{_base()}channels"


def _batch_key(channel: str) -> str:
    return f"{_base()}batch:{channel}"


def add(channel: str, callback_url: str, *, batch: bool = False, rate: float | None = None) -> bool:
    """Subscribe ``callback_url`` to ``channel``; False if it already was.

    ``batch`` and ``rate`` (events per second, for the URL on every channel) are
    remembered either way: registering again without them turns them off.
    """
    keys = [_channel_key(channel), _index_key(), _batch_key(channel)]
    added = bool(run_script(ADD_SCRIPT, keys, [callback_url, channel, int(batch)]))
    lanes.set_rate(callback_url, rate)
    return added


def remove(channel: str, callback_url: str) -> bool:
    """Unsubscribe ``callback_url`` from ``channel``; False if it was not subscribed."""
    keys = [_channel_key(channel), _index_key(), _batch_key(channel)]
    removed = bool(run_script(REMOVE_SCRIPT, keys, [callback_url, channel]))
    if removed and not subscribed(callback_url):
        lanes.forget_health(callback_url)  # toot_status lists no URL nobody subscribed
    return removed


def subscribed(callback_url: str) -> bool:
    """Whether ``callback_url`` is subscribed to any channel: one round trip for them all."""
    client = get_redis()
    channels = list(client.smembers(_index_key()))
    with client.pipeline(transaction=False) as pipe:
        for channel in channels:
            pipe.sismember(_channel_key(as_text(channel)), callback_url)
        return any(pipe.execute())


def subscribers(channels: Iterable[str]) -> dict[str, list[tuple[str, bool]]]:
    """Each channel's callback URLs, with whether each asked for batches; one round trip."""
    channels = list(dict.fromkeys(channels))
    with get_redis().pipeline(transaction=False) as pipe:
        for channel in channels:
            pipe.smembers(_channel_key(channel))
            pipe.smembers(_batch_key(channel))
        replies = pipe.execute()
    found = {}
    for channel, urls, batched in zip(channels, replies[::2], replies[1::2], strict=True):
        found[channel] = [(as_text(url), url in batched) for url in sorted(urls)]
    return found


def subscriptions(prefix: str = "") -> dict[str, list[str]]:
    """Every channel that starts with ``prefix``, with its callback URLs."""
    client = get_redis()
    channels = sorted(
        channel
        for channel in map(as_text, client.smembers(_index_key()))
        if channel.startswith(prefix)
    )
    with client.pipeline(transaction=False) as pipe:
        for channel in channels:
            pipe.smembers(_channel_key(channel))
        members = pipe.execute()
    pairs = zip(channels, members, strict=True)
    return {channel: sorted(map(as_text, urls)) for channel, urls in pairs if urls}


# KEYS: index; ARGV: key base. Every subscription as JSON, [channel, url, batch] each.
EVERY_SCRIPT = """
local out = {}
for _, channel in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local batched = {}
  for _, url in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'batch:' .. channel)) do
    batched[url] = true
  end
  for _, url in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'urls:' .. channel)) do
    out[#out + 1] = {channel, url, batched[url] and 1 or 0}
  end
end
if #out == 0 then return '[]' end
return cjson.encode(out)
"""


def every() -> list[tuple[str, str, bool]]:
    """Every subscription, (channel, callback URL, batch flag), sorted; one script call
    whatever their number."""
    reply = run_script(EVERY_SCRIPT, [_index_key()], [_base()])
    return sorted((channel, url, bool(batch)) for channel, url, batch in json.loads(as_text(reply)))
