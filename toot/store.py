"""The publisher's subscription store in Redis: one SET of callback URLs per channel.

Like the Ruby gem it keeps a SET per full channel (under ``KEY_PREFIX``); unlike it,
it keeps an index SET of channels instead of running ``KEYS``.
"""

from __future__ import annotations

from typing import Any

import redis
from django.utils.module_loading import import_string

from toot.conf import conf

_clients: dict[tuple[str, float], redis.Redis] = {}

# Add and remove keep the channel index in step with the channel's set, atomically.
ADD_SCRIPT = """
local added = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return added
"""
REMOVE_SCRIPT = """
local removed = redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
return removed
"""


def get_redis() -> redis.Redis:
    """The client for the store: ``TOOT["REDIS_CONNECTION"]`` if set, else one per URL."""
    if conf.REDIS_CONNECTION:
        client: redis.Redis = import_string(conf.REDIS_CONNECTION)()
        return client
    key = (conf.REDIS_URL, conf.REDIS_TIMEOUT)
    client = _clients.get(key)  # type: ignore[assignment]
    if client is None:
        client = _clients[key] = redis.Redis.from_url(
            key[0],
            socket_connect_timeout=key[1],
            socket_timeout=key[1],
            health_check_interval=30,
        )
    return client


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _channel_key(channel: str) -> str:
    return f"{conf.KEY_PREFIX}subscriptions:{channel}"


def _index_key() -> str:
    return f"{conf.KEY_PREFIX}channels"


def add(channel: str, callback_url: str) -> bool:
    """Subscribe ``callback_url`` to ``channel``; False if it already was."""
    keys = [_channel_key(channel), _index_key()]
    return bool(get_redis().eval(ADD_SCRIPT, 2, *keys, callback_url, channel))


def remove(channel: str, callback_url: str) -> bool:
    """Unsubscribe ``callback_url`` from ``channel``; False if it was not subscribed."""
    keys = [_channel_key(channel), _index_key()]
    return bool(get_redis().eval(REMOVE_SCRIPT, 2, *keys, callback_url, channel))


def callback_urls(channel: str) -> list[str]:
    return sorted(as_text(url) for url in get_redis().smembers(_channel_key(channel)))


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
