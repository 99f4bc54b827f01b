"""OpenTelemetry for the example: each process appends the spans it finishes to one file,
as JSON lines, so that a test (or you) can follow one event's trace across both projects.

Set ``TOOT_TRACE_FILE`` to turn it on (it needs ``opentelemetry-sdk``); the settings turn
toot's ``TRACING`` on with it. ``TOOT_TRACE_FILE=discard`` makes the spans and drops them,
through a batch span processor, for the benchmark's ``--tracing``. A real project sends
its spans to a collector instead, with an OTLP exporter (docs/tracing.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

DISCARD = "discard"


class JsonLinesExporter(SpanExporter):
    """Appends each span to ``path`` as a line of JSON, in one write: the processes of
    both projects share the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(as_dict(span)) + "\n" for span in spans)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class DiscardingExporter(SpanExporter):
    """Drops every span: what tracing costs toot and the SDK, without an exporter's work."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def as_dict(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "service": span.resource.attributes.get("service.name"),
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
    }


def export_spans_to(path: str, service: str) -> None:
    """Make this process's tracer provider, named ``service``, export to ``path`` (or drop
    its spans, for DISCARD).

    Spans go to the file as each ends (SimpleSpanProcessor): no thread to lose in a fork
    of gunicorn or of Celery's prefork pool, and nothing to flush when a process exits.
    The SDK's BatchSpanProcessor starts its thread again after a fork.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if path == DISCARD:
        provider.add_span_processor(BatchSpanProcessor(DiscardingExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    trace.set_tracer_provider(provider)
