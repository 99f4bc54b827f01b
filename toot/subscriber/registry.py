"""Local subscriptions: which handler runs for which source's channel."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar, overload

from toot.conf import Source, conf
from toot.protocol.events import Event
from toot.protocol.validation import check_channel

Handler = Callable[[Event], object]
H = TypeVar("H", bound=Handler)


class Subscription(NamedTuple):
    source: str
    channel: str  # the suffix; the source's CHANNEL_PREFIX completes it
    handler: Handler
    queue: str | None = None  # the Celery queue of the handler's drains; None: the default

    @property
    def full_channel(self) -> str:
        return conf.source(self.source).channel_prefix + self.channel


class Registry:
    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []

    def register(
        self, source: str, channel: str, handler: Handler, queue: str | None = None
    ) -> None:
        if not callable(handler):
            raise TypeError(f"toot handler must be callable, not {handler!r}")
        subscription = Subscription(source, channel, handler, queue)
        check_channel(subscription.full_channel)  # raises ConfigError for an unknown source
        if subscription not in self._subscriptions:
            self._subscriptions.append(subscription)

    def reset(self) -> None:
        """Forget every subscription (for tests)."""
        self._subscriptions.clear()

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subscriptions)

    def matching(self, channel: str) -> list[tuple[Source, Handler]]:
        """The handlers subscribed to the full ``channel``, with the source of each."""
        sources = conf.SOURCES
        # A subscription whose source has since gone from the settings matches nothing;
        # the system check toot.E004 reports it.
        return [
            (sources[sub.source], sub.handler)
            for sub in self._subscriptions
            if sub.source in sources and sources[sub.source].channel_prefix + sub.channel == channel
        ]

    def handlers_for(self, channel: str) -> list[Handler]:
        # Once each: subscribed again with another queue, a handler still runs once.
        handlers: list[Handler] = []
        for _, handler in self.matching(channel):
            if handler not in handlers:
                handlers.append(handler)
        return handlers


registry = Registry()


@overload
def subscribe(source: str, channel: str, *, queue: str | None = None) -> Callable[[H], H]: ...
@overload
def subscribe(source: str, channel: str, handler: H, *, queue: str | None = None) -> H: ...
def subscribe(
    source: str, channel: str, handler: H | None = None, *, queue: str | None = None
) -> H | Callable[[H], H]:
    """Run ``handler(event)`` for every event on ``channel`` of ``source``.

    Use it as ``@subscribe(source, channel)`` or ``subscribe(source, channel, handler)``,
    from an ``AppConfig.ready()`` so that web and worker processes both see it. Each
    handler has its events drained apart from the others'; ``queue`` sends those drains
    to a Celery queue of its own, for a worker of their own (``celery worker -Q queue``).
    """

    def decorator(func: H) -> H:
        registry.register(source, channel, func, queue)
        return func

    return decorator if handler is None else decorator(handler)
