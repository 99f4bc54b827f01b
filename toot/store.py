"""The publisher's subscription store in Redis: one SET of callback URLs per channel.

Like the Ruby gem it keeps a SET per full channel (under ``KEY_PREFIX``); unlike it,
it keeps an index SET of channels instead of running ``KEYS``, and a SET per channel of
the callback URLs that asked for batches (PROTOCOL.md section 7).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from toot.conf import conf

_clients: dict[tuple[str, float], redis.Redis] = {}
_scripts: dict[str, Script] = {}

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


def get_redis() -> redis.Redis:
    """The client for the store: ``TOOT["REDIS_CONNECTION"]`` if set, else one per URL."""
    factory = conf.REDIS_CONNECTION
    if factory is not None:
        return factory()
    key = (conf.REDIS_URL, conf.REDIS_TIMEOUT)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = new_client(*key)
    return client


# Celery's rediss:// URLs name ssl's constants, ssl_cert_reqs=CERT_REQUIRED, which redis-py
# refuses: it takes required, optional or none. REDIS_URL defaults to the broker's URL.
_CELERY_CERT_REQS = re.compile(r"([?&]ssl_cert_reqs=)CERT_(REQUIRED|OPTIONAL|NONE)(?=&|$)", re.I)


def new_client(url: str, timeout: float) -> redis.Redis:
    """The client toot builds from REDIS_URL and REDIS_TIMEOUT."""
    return redis.Redis.from_url(
        _CELERY_CERT_REQS.sub(lambda match: match[1] + match[2].lower(), url),
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        # No retry of a command whose reply was lost: a claim run twice would drop the
        # batch the first run took. redis-py's Redis() has retried by default since 6.0.
        retry=Retry(NoBackoff(), 0),
    )


def run_script(text: str, keys: Sequence[str], args: Iterable[Any]) -> Any:
    """Run a Lua script by its SHA (EVALSHA), loading it once per server."""
    client = get_redis()
    script = _scripts.get(text)
    if script is None:
        script = _scripts[text] = client.register_script(text)
    return script(keys=keys, args=list(args), client=client)


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _channel_key(channel: str) -> str:
    return f"{conf.KEY_PREFIX}subscriptions:{channel}"


def _index_key() -> str:
    return f"{conf.KEY_PREFIX}channels"


def _batch_key(channel: str) -> str:
    return f"{conf.KEY_PREFIX}batch:{channel}"


def add(channel: str, callback_url: str, *, batch: bool = False) -> bool:
    """Subscribe ``callback_url`` to ``channel``; False if it already was.

    ``batch`` is remembered either way: registering again without it turns batches off.
    """
    keys = [_channel_key(channel), _index_key(), _batch_key(channel)]
    return bool(run_script(ADD_SCRIPT, keys, [callback_url, channel, int(batch)]))


def remove(channel: str, callback_url: str) -> bool:
    """Unsubscribe ``callback_url`` from ``channel``; False if it was not subscribed."""
    keys = [_channel_key(channel), _index_key(), _batch_key(channel)]
    return bool(run_script(REMOVE_SCRIPT, keys, [callback_url, channel]))


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
