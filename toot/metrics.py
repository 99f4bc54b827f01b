"""Prometheus metrics of what toot does, through ``prometheus_client`` (the ``prometheus``
extra), when ``TOOT["METRICS"]`` is true. docs/metrics.md lists them.

The counters and histograms are receivers of toot's signals (toot.signals), connected in
``AppConfig.ready()`` only when the setting is on: switched off, no receiver is connected
and the signals cost what they cost without metrics. prometheus_client is imported only
then too, so that a project without the extra never imports it.

They live in the process that sends the signal (a web process, a Celery worker's child):
under gunicorn's workers and Celery's prefork pool, one process's registry holds a part
of the counts. prometheus_client's multiprocess mode (``$PROMETHEUS_MULTIPROC_DIR``) adds
them up at scrape time; ``view`` does so when the variable is set.

The gauges (queue depth, retries waiting) are not kept per process but read from Redis by
``QueueCollector`` at scrape time: what toot holds is the same whichever process asks.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
from django.http import Http404, HttpRequest, HttpResponse
from django.views.decorators.http import require_GET

from toot import signals
from toot.conf import conf
from toot.exceptions import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from toot.protocol.events import Event

logger = logging.getLogger(__name__)

# Seconds, from a fast local handler (milliseconds) to an event that waited for retries
# (an hour): the histograms' buckets, the same for the three so that they compare.
BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
    3600.0,
)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def available() -> bool:
    """Whether prometheus_client can be imported (the ``prometheus`` extra)."""
    return importlib.util.find_spec("prometheus_client") is not None


def enabled() -> bool:
    """Whether ``TOOT["METRICS"]`` is on; a malformed value counts as off (toot.E002 says)."""
    try:
        return conf.METRICS
    except ConfigError:
        return False


def status_class(status: int | None) -> str:
    """``"2xx"`` ... ``"5xx"``, or ``"none"`` when no answer came (a timeout, a refusal)."""
    if status is None or not 100 <= status < 600:
        return "none"
    return f"{status // 100}xx"


class Children:
    """A labelled metric's children, each looked up once: ``labels()`` takes a lock and
    checks its values at every call, which cost as much as the increment itself."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        try:
            return self.children[values]
        except KeyError:
            # labels() gives every thread the same child; a race only looks it up twice.
            child = self.children[values] = self.metric.labels(*values)
            return child


class Metrics:
    """toot's counters and histograms, created once per process on the default registry
    (where prometheus_client's own exposition and multiprocess mode expect them)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Children:
            return Children(Counter(name, doc, labels))

        def histogram(name: str, doc: str, labels: tuple[str, ...]) -> Children:
            return Children(Histogram(name, doc, labels, buckets=BUCKETS))

        self.published = counter(
            "toot_events_published",
            "Events published (handed to Redis or the outbox).",
            ("channel",),
        )
        self.delivered = counter(
            "toot_events_delivered",
            "Events in deliveries that a callback URL answered 2xx.",
            ("channel",),
        )
        self.failed = counter(
            "toot_deliveries_failed",
            "Delivery attempts (requests) that failed, by status class (none: no answer).",
            ("channel", "status_class"),
        )
        self.dead_lettered = counter(
            "toot_events_dead_lettered",
            "Events that failed every attempt: kind delivery (publisher) or handler (subscriber).",
            ("channel", "kind"),
        )
        self.received = counter(
            "toot_events_received", "Events the callbacks endpoint accepted.", ("channel",)
        )
        self.handled = counter(
            "toot_events_handled", "Handler runs that returned.", ("channel", "handler")
        )
        self.handler_failed = counter(
            "toot_handler_failures", "Handler runs that raised.", ("channel", "handler")
        )
        self.delivery_seconds = histogram(
            "toot_delivery_duration_seconds",
            "Seconds a delivery request took, answered or not.",
            ("channel",),
        )
        self.handler_seconds = histogram(
            "toot_handler_duration_seconds",
            "Seconds a handler run took, returned or raised.",
            ("channel", "handler"),
        )
        self.publish_to_handled_seconds = histogram(
            "toot_publish_to_handled_seconds",
            "Seconds from an event's timestamp (publisher's clock) to its handler's return "
            "(subscriber's clock).",
            ("channel",),
        )


_metrics: Metrics | None = None


def get() -> Metrics:
    """This process's metrics, created on first use."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


# Receivers: each reads the signal's documented keyword arguments (docs/api.md).


def on_published(sender: Any, event: Event, **kwargs: Any) -> None:
    get().published(event.channel).inc()


def on_delivery_succeeded(
    sender: Any, channel: str, events: list[Event], duration: float | None, **kwargs: Any
) -> None:
    metrics = get()
    metrics.delivered(channel).inc(len(events))
    if duration is not None:
        metrics.delivery_seconds(channel).observe(duration)


def on_delivery_failed(
    sender: Any, channel: str, status: int | None, duration: float | None, **kwargs: Any
) -> None:
    metrics = get()
    metrics.failed(channel, status_class(status)).inc()
    if duration is not None:  # None: no request was sent (refused by the SSRF guard...)
        metrics.delivery_seconds(channel).observe(duration)


def on_dead_lettered(sender: Any, event: Event, kind: str, **kwargs: Any) -> None:
    get().dead_lettered(event.channel, kind).inc()


def on_received(sender: Any, events: list[Event], channel: str, **kwargs: Any) -> None:
    get().received(channel).inc(len(events))


def on_handler_succeeded(
    sender: Any, event: Event, handler: str, duration: float, **kwargs: Any
) -> None:
    metrics = get()
    metrics.handled(event.channel, handler).inc()
    metrics.handler_seconds(event.channel, handler).observe(duration)
    # Two machines' clocks: skew shows here, and a negative difference is clamped to 0.
    latency = max(0.0, time.time() - event.timestamp.timestamp())
    metrics.publish_to_handled_seconds(event.channel).observe(latency)


def on_handler_failed(
    sender: Any, event: Event, handler: str, duration: float | None, **kwargs: Any
) -> None:
    metrics = get()
    metrics.handler_failed(event.channel, handler).inc()
    if duration is not None:  # None: the handler did not run
        metrics.handler_seconds(event.channel, handler).observe(duration)


RECEIVERS = (
    (signals.event_published, on_published),
    (signals.delivery_succeeded, on_delivery_succeeded),
    (signals.delivery_failed, on_delivery_failed),
    (signals.dead_lettered, on_dead_lettered),
    (signals.event_received, on_received),
    (signals.handler_succeeded, on_handler_succeeded),
    (signals.handler_failed, on_handler_failed),
)


def setup(**kwargs: Any) -> None:
    """Connect the receivers if ``TOOT["METRICS"]`` is on (and prometheus_client is
    installed; toot.E011 says when not), disconnect them if off. Called by
    ``AppConfig.ready()`` and again whenever a setting changes (``override_settings``)."""
    if kwargs.get("setting", "TOOT") != "TOOT":
        return
    # The setting itself, not conf's kept value, which setting_changed may not have
    # dropped yet when this receiver runs.
    conf.forget()
    on = enabled() and available()
    for signal, receiver in RECEIVERS:
        uid = f"toot.metrics.{receiver.__name__}"
        if on:
            signal.connect(receiver, dispatch_uid=uid)
        else:
            signal.disconnect(dispatch_uid=uid)
    if on:
        get()


class QueueCollector:
    """Gauges read from Redis at scrape time: what waits in toot's queues and for a retry.

    Register it on the registry a scrape reads (``view`` does) or on prometheus_client's
    default one (``REGISTRY.register(QueueCollector())``) when the project exposes
    metrics its own way. Queues: ``out`` (events to fan out), ``deliveries`` (the
    publisher's per-callback-URL lanes), ``in`` and ``in:<handler>`` (handler runs).
    """

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("toot_redis_up", "Whether toot's Redis answered this scrape.")
        try:
            depths, retries = self._read()
        except redis.RedisError as exc:  # the scrape still answers, with the counters
            logger.warning("Metrics: toot's queues could not be read from Redis: %r", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily(
            "toot_queue_depth",
            "Items ready or being worked on in each of toot's queues.",
            labels=["queue"],
        )
        waiting = GaugeMetricFamily(
            "toot_retries_waiting",
            "Items waiting for their retry in each of toot's queues.",
            labels=["queue"],
        )
        for name, value in depths.items():
            depth.add_metric([name], value)
        for name, value in retries.items():
            waiting.add_metric([name], value)
        yield depth
        yield waiting

    @staticmethod
    def _read() -> tuple[dict[str, int], dict[str, int]]:
        from toot.engine import queue
        from toot.publisher import lanes

        depths, retries = {}, {}
        names = [queue.OUT, queue.IN, *sorted(queue.lanes())]
        for name in names:
            found = queue.depth(name)
            depths[name] = found.ready + found.held
            retries[name] = found.retries
        lane_retries = sum(r.count for r in lanes.retries().values())
        depths["deliveries"] = lanes.pending() - lane_retries
        retries["deliveries"] = lane_retries
        return depths, retries


class _Default:
    """prometheus_client's default registry as one collector of the scrape's registry."""

    def collect(self) -> Iterator[Metric]:
        from prometheus_client import REGISTRY

        yield from REGISTRY.collect()


def registry() -> CollectorRegistry:
    """A registry for one scrape: every process's metrics in multiprocess mode (else this
    process's default registry), and the queue gauges."""
    from prometheus_client import CollectorRegistry

    scraped = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(scraped)  # type: ignore[no-untyped-call]
    else:
        scraped.register(_Default())
    scraped.register(QueueCollector())
    return scraped


@require_GET
def view(request: HttpRequest) -> HttpResponse:
    """The metrics in Prometheus' text format; 404 while ``TOOT["METRICS"]`` is off.

    It checks no credentials: mount it where only the scraper reaches it, or wrap it in
    a check of your own (docs/metrics.md).
    """
    if not (enabled() and available()):
        raise Http404("toot's metrics are off")
    from prometheus_client.exposition import choose_encoder

    # Prometheus' text format, or OpenMetrics when the scraper asks for it.
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encode(registry()), content_type=content_type)
