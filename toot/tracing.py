"""OpenTelemetry traces of an event, from ``publish()`` to each handler run (docs/tracing.md).

The only module that imports opentelemetry, and only once ``TOOT["TRACING"]`` is on:
the pipeline imports it behind that setting, so that tracing off costs a setting read per
step, no header and no extra queue field.

An event waits in Redis between its steps, and is worked on by other threads and other
processes: the context goes with it as a W3C ``traceparent`` string next to the event in
each queue item, and on the wire as a ``traceparent`` header (a toot extension the Ruby
gem ignores). Only ``traceparent`` travels: ``tracestate`` and baggage stay behind.

Spans (messaging semantic conventions where they fit):

- ``publish <channel>`` (PRODUCER), in the caller's span;
- ``send <channel>`` (CLIENT), one per delivery attempt, child of the event's publish
  span; a batch's is the child of its first event's, with a link to each event's;
- ``receive <channel>`` (SERVER), the callbacks view, child of the header's context (or of
  the request's span, where the project's instrumentation made one);
- ``process <channel>`` (CONSUMER), one per handler run, child of the receive span.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from django.http import HttpRequest

    from toot.protocol.events import Event

# The header, and the queue items' field, that carries the context.
TRACEPARENT = "traceparent"
SYSTEM = "toot"


def _version() -> str | None:
    # Not toot.__version__: toot imports publish, which imports this module.
    try:
        return importlib.metadata.version("django-toot")
    except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path
        return None


_propagator = TraceContextTextMapPropagator()
# A proxy until the project sets its tracer provider, whenever it does.
_tracer = trace.get_tracer("toot", _version())


def traceparent(span: Span) -> str | None:
    """The span's context as a W3C traceparent; None for a span that is not recorded
    (no SDK, or sampled out), whose context is invalid."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get(TRACEPARENT)


def context_of(value: str | None) -> Context | None:
    """The context a traceparent carries; None for none, or one that does not parse."""
    if not value:
        return None
    context = _propagator.extract({TRACEPARENT: value})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _span_context(value: str | None) -> trace.SpanContext | None:
    context = context_of(value)
    return None if context is None else trace.get_current_span(context).get_span_context()


def _attributes(operation: str, kind: str, channel: str) -> dict[str, Any]:
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.name": operation,
        "messaging.operation.type": kind,
        "messaging.destination.name": channel,
    }


@contextmanager
def publishing(event: Event) -> Iterator[str | None]:
    """The ``publish`` span, in the caller's context; yields the traceparent its queue
    item carries."""
    attributes = _attributes("publish", "send", event.channel)
    attributes["messaging.message.id"] = event.id
    with _tracer.start_as_current_span(
        f"publish {event.channel}", kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        yield traceparent(span)


@contextmanager
def sending(
    url: str,
    channel: str,
    delivery_id: str,
    batch: bool,
    event_ids: Sequence[str],
    traceparents: Sequence[str | None],
    attempt: int,
) -> Iterator[tuple[dict[str, str], Span]]:
    """A delivery attempt's span; yields the headers that carry it, and the span, for
    ``sent``. Its parent is the first event's context that there is; a batch's span
    (``batch``: a delivery in the batch wrapper, of one event or more) links to each of
    its events' contexts."""
    contexts = [c for c in map(_span_context, traceparents) if c is not None]
    parent = trace.set_span_in_context(trace.NonRecordingSpan(contexts[0])) if contexts else None
    attributes = _attributes("send", "send", channel)
    attributes |= {"url.full": url, "messaging.toot.delivery.attempt": attempt}
    if batch:
        attributes["messaging.batch.message_count"] = len(event_ids)
        attributes["messaging.toot.batch.id"] = delivery_id
        attributes["messaging.toot.event.ids"] = list(event_ids)
        links = [Link(context) for context in contexts]
    else:
        attributes["messaging.message.id"] = event_ids[0]
        links = []
    span = _tracer.start_span(
        f"send {channel}",
        context=parent or Context(),  # never the sender thread's own
        kind=SpanKind.CLIENT,
        attributes=attributes,
        links=links,
    )
    try:
        header = traceparent(span)
        yield ({TRACEPARENT: header} if header else {}), span
    finally:
        span.end()


def sent(span: Span, status: int | None, error: str) -> None:
    """Record how a delivery attempt went on its span: the answer's status, if any, and
    what failed (``error``, empty for a success)."""
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if error or status is None or not 200 <= status < 300:
        span.set_status(Status(StatusCode.ERROR, error or None))
        span.set_attribute("error.type", str(status or "no answer"))


class Receipt:
    """The ``receive`` span of one request to the callbacks view."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.traceparent: str | None = None

    def events(self, events: Sequence[Event]) -> None:
        """Name the span after what the request carries, once it has been read."""
        channel = events[0].channel
        self.span.update_name(f"receive {channel}")
        self.span.set_attributes(_attributes("receive", "receive", channel))
        if len(events) > 1:
            self.span.set_attribute("messaging.batch.message_count", len(events))
            self.span.set_attribute("messaging.toot.event.ids", [event.id for event in events])
        else:
            self.span.set_attribute("messaging.message.id", events[0].id)

    def answered(self, status: int) -> None:
        """Record the answer's status: an error of the receipt only for a 5xx, as a
        server span's (a 4xx is the sender's)."""
        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR))


@contextmanager
def receiving(request: HttpRequest) -> Iterator[Receipt]:
    """The ``receive`` span: in the request's span if the project's instrumentation made
    one, else in the context of the delivery's traceparent header."""
    parent = None
    if not trace.get_current_span().get_span_context().is_valid:
        parent = context_of(request.headers.get(TRACEPARENT))
    with _tracer.start_as_current_span(
        "receive", context=parent, kind=SpanKind.SERVER, attributes={"messaging.system": SYSTEM}
    ) as span:
        receipt = Receipt(span)
        receipt.traceparent = traceparent(span)
        yield receipt


@contextmanager
def running(event: Event, handler: str, traceparent: str | None) -> Iterator[Span]:
    """A handler run's span, child of the receipt's (``traceparent``, from the queue
    item) or, without one (a dead letter replayed), of the current span."""
    attributes = _attributes("process", "process", event.channel)
    attributes |= {"messaging.message.id": event.id, "messaging.toot.handler": handler}
    with _tracer.start_as_current_span(
        f"process {event.channel}",
        context=context_of(traceparent),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span
