"""OpenTelemetry traces (toot.tracing) through the real pipeline: publish(), the worker's
senders against real HTTP peers, the callbacks endpoint served by a live server and the
handlers run by the real worker, all in this process, with the SDK's in-memory exporter.
tests/test_end_to_end.py follows a trace across real processes."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import uuid

import pytest
from django.conf import settings
from django.core.checks import Error
from django.test import override_settings
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import toot
from devtools.processes import ROOT
from tests.http_server import HTTPServer, Reply, in_order
from tests.utils import redis_down
from toot import tracing as tracing_module
from toot.checks import check_settings
from toot.protocol.events import wire_json
from toot.publisher import lanes, sending, store
from toot.subscriber import handling
from toot.subscriber.registry import subscribe

SOURCE_PREFIX = "org.example.publisher."
# The tests' own provider, set once for the process (OpenTelemetry allows one).
EXPORTER = InMemorySpanExporter()


PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture(autouse=True)
def _provider():
    if trace.get_tracer_provider() is not PROVIDER:  # once: OpenTelemetry allows no other
        trace.set_tracer_provider(PROVIDER)
    assert trace.get_tracer_provider() is PROVIDER, "another module set a tracer provider"


@pytest.fixture
def spans():
    """The spans finished during the test, as the exporter got them."""
    EXPORTER.clear()
    yield EXPORTER.get_finished_spans
    EXPORTER.clear()


@pytest.fixture
def tracing():
    with override_settings(TOOT={**settings.TOOT, "TRACING": True}):
        yield


@pytest.fixture
def suffix():
    return f"tracing.{uuid.uuid4().hex[:8]}.v1"


def named(spans, prefix, channel):
    return [span for span in spans() if span.name == f"{prefix} {channel}"]


def parent_of(span):
    return span.parent.span_id if span.parent else None


# The whole path ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_one_trace_runs_from_the_publisher_s_request_to_the_handler(
    tracing, worker, live_server, eventually, spans, suffix, batch
):
    seen: list[toot.Event] = []
    subscribe("publisher", suffix, seen.append)
    channel = SOURCE_PREFIX + suffix
    url = f"{live_server.url}/toot/callbacks"
    store.add(channel, url, batch=batch)
    [name] = handling.handlers_by_name(channel)

    with trace.get_tracer("tests").start_as_current_span("POST /orders") as request:
        event = toot.publish(suffix, {"id": 1}, prefix=SOURCE_PREFIX)

    eventually(lambda: named(spans, "process", channel), what="the handler's span")
    eventually(lambda: named(spans, "send", channel), what="the delivery's span to end")
    assert seen == [event]
    [publish] = named(spans, "publish", channel)
    [send] = named(spans, "send", channel)
    [receive] = named(spans, "receive", channel)
    [process] = named(spans, "process", channel)
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in (publish, send, receive, process)} == {trace_id}
    assert parent_of(publish) == request.get_span_context().span_id
    assert parent_of(send) == publish.context.span_id
    assert parent_of(receive) == send.context.span_id
    assert parent_of(process) == receive.context.span_id
    kinds = [s.kind for s in (publish, send, receive, process)]
    assert kinds == [SpanKind.PRODUCER, SpanKind.CLIENT, SpanKind.SERVER, SpanKind.CONSUMER]
    for span in (publish, send, receive, process):
        assert span.attributes["messaging.system"] == "toot"
        assert span.attributes["messaging.destination.name"] == channel
        assert span.status.status_code != StatusCode.ERROR
    assert publish.attributes["messaging.message.id"] == event.id
    assert process.attributes["messaging.message.id"] == event.id
    assert process.attributes["messaging.toot.handler"] == name
    assert send.attributes["url.full"] == url
    assert send.attributes["http.response.status_code"] == 200
    assert send.attributes["messaging.toot.delivery.attempt"] == 1
    assert receive.attributes["http.response.status_code"] == 200
    if batch:  # a batch of one: its links name its one event's publish
        assert [link.context.span_id for link in send.links] == [publish.context.span_id]
        assert send.attributes["messaging.toot.event.ids"] == (event.id,)
    else:
        assert send.attributes["messaging.message.id"] == event.id
        assert not send.links


def test_retries_are_children_of_the_same_publish(
    tracing, worker, live_server, eventually, spans, suffix
):
    failing = [RuntimeError("a bug, fixed by the second run")]

    def handler(event):
        if failing:
            raise failing.pop()

    subscribe("publisher", suffix, handler)
    channel = SOURCE_PREFIX + suffix
    with HTTPServer(in_order(Reply(503, body=b"busy"), Reply(200))) as peer:
        store.add(channel, peer.url)
        toot.publish(suffix, {"id": 2}, prefix=SOURCE_PREFIX)
        eventually(lambda: len(named(spans, "send", channel)) == 2, what="the retry")
        [first_request, second_request] = peer.requests
    first, second = sorted(named(spans, "send", channel), key=lambda s: s.start_time)
    [publish] = named(spans, "publish", channel)
    assert parent_of(first) == parent_of(second) == publish.context.span_id
    assert first.attributes["messaging.toot.delivery.attempt"] == 1
    assert first.attributes["http.response.status_code"] == 503
    assert first.status.status_code == StatusCode.ERROR
    assert (second.attributes["messaging.toot.delivery.attempt"], second.status.is_ok) == (2, True)
    # Each attempt's header names its own span.
    for request, span in ((first_request, first), (second_request, second)):
        assert request.headers["traceparent"] == traceparent(span)

    # The handler's retry runs in the trace of the request that queued it.
    store.remove(channel, peer.url)
    store.add(channel, f"{live_server.url}/toot/callbacks")
    toot.publish(suffix, {"id": 3}, prefix=SOURCE_PREFIX)
    eventually(lambda: len(named(spans, "process", channel)) == 2, what="the handler's retry")
    [receive] = named(spans, "receive", channel)
    failed, ran = sorted(named(spans, "process", channel), key=lambda s: s.start_time)
    assert parent_of(failed) == parent_of(ran) == receive.context.span_id
    assert failed.status.status_code == StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert ran.status.status_code != StatusCode.ERROR


def traceparent(span):
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_a_batch_s_delivery_links_each_event_s_trace(tracing, spans, suffix):
    channel = "org.example.test." + suffix
    tracer = trace.get_tracer("tests")
    published = []
    for n in range(3):
        with tracer.start_as_current_span(f"request {n}") as root:
            published.append((toot.Event(channel, {"n": n}), traceparent(root)))
    # As fan_out queues them: the third was published with tracing off.
    items = [f"B{tp}{json.dumps(e.to_dict())}" for e, tp in published[:2]]
    items.append(f"B{json.dumps(published[2][0].to_dict())}")
    with HTTPServer(Reply(200)) as peer:
        [delivery] = sending.plan(peer.url, items)
        assert delivery.traceparents == (published[0][1], published[1][1], None)

        assert sending.send(delivery).ok

        [request] = peer.requests
    [send] = named(spans, "send", channel)
    first, second = (tp.split("-") for _, tp in published[:2])
    assert f"{send.context.trace_id:032x}" == first[1]
    assert f"{parent_of(send):016x}" == first[2]
    assert [
        (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") for link in send.links
    ] == [
        (first[1], first[2]),
        (second[1], second[2]),
    ]
    assert send.attributes["messaging.batch.message_count"] == 3
    assert send.attributes["messaging.toot.batch.id"] == delivery.id
    assert request.headers["traceparent"] == traceparent(send)
    # The wire body is the protocol's, whatever the trace.
    assert [e["id"] for e in request.json()["events"]] == [e.id for e, _ in published]
    assert "traceparent" not in request.body.decode()


# The callbacks view -----------------------------------------------------------------------

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_refused_delivery_s_receipt_is_in_its_trace_and_not_an_error(tracing, client, spans):
    response = client.post(
        "/toot/callbacks",
        b'{"channel": 1}',
        content_type="application/json",
        HTTP_TRACEPARENT=PARENT,
    )

    assert response.status_code == 422
    [receive] = spans()
    assert (receive.name, receive.kind) == ("receive", SpanKind.SERVER)
    assert f"{receive.context.trace_id:032x}" == PARENT.split("-")[1]
    assert f"{parent_of(receive):016x}" == PARENT.split("-")[2]
    assert receive.attributes["http.response.status_code"] == 422
    assert receive.status.status_code != StatusCode.ERROR


def test_a_header_that_does_not_parse_starts_a_trace(tracing, client, spans, suffix):
    event = toot.Event(SOURCE_PREFIX + suffix, {"id": 8})  # nobody here subscribes

    response = client.post(
        "/toot/callbacks", event.to_json(), content_type="application/json", HTTP_TRACEPARENT="00-x"
    )

    assert (response.status_code, response["X-Toot-Unsubscribe"]) == (200, "True")
    [receive] = spans()
    assert (receive.name, receive.parent) == (f"receive {event.channel}", None)
    assert receive.attributes["messaging.message.id"] == event.id


def test_a_receipt_the_store_fails_is_an_error(tracing, client, spans, suffix):
    subscribe("publisher", suffix, lambda event: None)
    event = toot.Event(SOURCE_PREFIX + suffix, {"id": 9})

    with redis_down():
        response = client.post("/toot/callbacks", event.to_json(), content_type="application/json")

    assert response.status_code == 503
    [receive] = spans()
    assert receive.status.status_code == StatusCode.ERROR
    assert receive.attributes["http.response.status_code"] == 503


def test_a_batch_s_receipt_names_its_events(tracing, client, spans, suffix):
    events = [toot.Event(SOURCE_PREFIX + suffix, {"n": n}) for n in range(2)]
    body = json.dumps({"events": [event.to_dict() for event in events]})

    assert client.post("/toot/callbacks", body, content_type="application/json").status_code == 200

    [receive] = spans()
    assert receive.attributes["messaging.batch.message_count"] == 2
    assert receive.attributes["messaging.toot.event.ids"] == tuple(e.id for e in events)


def test_the_request_s_span_of_the_project_s_instrumentation_is_the_receipt_s_parent(
    tracing, client, spans, suffix
):
    event = toot.Event(SOURCE_PREFIX + suffix, {"id": 10})

    # As opentelemetry-instrumentation-django's middleware would, from the same header.
    with trace.get_tracer("tests").start_as_current_span("POST /toot/callbacks") as request:
        client.post(
            "/toot/callbacks",
            event.to_json(),
            content_type="application/json",
            HTTP_TRACEPARENT=PARENT,
        )

    receive = next(span for span in spans() if span.name.startswith("receive"))
    assert parent_of(receive) == request.get_span_context().span_id


def test_a_delivery_that_gets_no_answer_is_an_error_without_a_status(tracing, spans, suffix):
    channel = "org.example.test." + suffix
    with HTTPServer() as peer:
        url = peer.url
    event = toot.Event(channel, {"id": 11})
    [delivery] = sending.plan(url, [lanes.SINGLE + PARENT + event.to_json()])

    assert not sending.send(delivery).ok

    [send] = spans()
    assert "http.response.status_code" not in send.attributes
    assert send.status.status_code == StatusCode.ERROR
    assert send.attributes["error.type"] == "no answer"
    assert f"{send.context.trace_id:032x}" == PARENT.split("-")[1]


def test_the_tracer_s_version_is_toot_s_or_none_from_a_checkout(monkeypatch):
    assert tracing_module._version() == toot.__version__

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert tracing_module._version() is None


# Queue items -------------------------------------------------------------------------------


def test_traced_items_keep_their_context_through_the_queues(tracing, spans, suffix):
    channel = "org.example.test." + suffix
    url = "https://subscriber.example/toot/callbacks"
    event = toot.Event(channel, {"id": 4}).to_dict()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    item = lanes.SINGLE + parent + json.dumps(event)  # as fan_out makes it
    [delivery] = sending.plan(url, [item])
    assert (delivery.traceparents, delivery.body) == ((parent,), json.dumps(event).encode())
    # A retry keeps it, and a retry from before tracing has none.
    retry = json.dumps(sending.Delivery.as_item(delivery))
    assert json.loads(retry)["delivery"]["traceparents"] == [parent]
    assert sending.plan(url, [retry])[0].traceparents == (parent,)
    old = {k: v for k, v in json.loads(retry)["delivery"].items() if k != "traceparents"}
    assert sending.plan(url, [json.dumps({"delivery": old})])[0].traceparents == ()
    # An item of a toot from before tracing: as it was.
    [plain] = sending.plan(url, [lanes.SINGLE + json.dumps(event)])
    assert (plain.traceparents, plain.body) == ((), json.dumps(event).encode())


def test_fan_out_puts_the_context_between_prefix_and_event(tracing, suffix):
    channel = "org.example.test." + suffix
    url = "https://subscriber.example/toot/callbacks"
    store.add(channel, url, batch=True)
    event = toot.Event(channel, {"id": 5}).to_dict()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        by_url = sending.fan_out([{"event": event}, {"event": event, "traceparent": parent}])
    finally:
        store.remove(channel, url)
    batch, [untraced, traced] = by_url[url]
    assert batch
    assert untraced == lanes.BATCHED + wire_json(event)
    assert traced == lanes.BATCHED + parent + wire_json(event)


# Tracing off ------------------------------------------------------------------------------


def test_off_sends_no_header(worker, eventually, spans, suffix):
    channel = "org.example.test." + suffix
    with HTTPServer(Reply(200)) as peer:
        store.add(channel, peer.url)
        with trace.get_tracer("tests").start_as_current_span("POST /orders"):
            toot.publish(suffix, {"id": 6})
        eventually(lambda: peer.requests, what="the delivery")
        [request] = peer.requests
    assert "traceparent" not in request.headers
    assert [span.name for span in spans()] == ["POST /orders"]


def test_off_imports_no_opentelemetry():
    # Recent redis-py imports opentelemetry itself where it is installed: toot's own
    # import of it is toot.tracing's, which nothing imports while tracing is off.
    code = (
        "import sys, django; django.setup()\n"
        "from django.core.management import call_command\n"
        "import toot.publisher.sending, toot.subscriber.handling, toot.views, toot.tasks\n"
        "call_command('check')\n"
        "print(sorted(m for m in sys.modules if m == 'toot.tracing'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        check=True,
    )
    assert result.stdout.splitlines()[-1] == "[]"


def test_only_toot_tracing_imports_opentelemetry():
    package = ROOT / "toot"
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(name.split(".")[0] == "opentelemetry" for name in names):
                importers.add(str(path.relative_to(ROOT)))
    assert importers == {"toot/tracing.py"}


# Settings and checks ----------------------------------------------------------------------


def test_a_tracing_setting_that_is_not_a_bool_is_an_error():
    with override_settings(TOOT={**settings.TOOT, "TRACING": "yes"}):
        [message] = check_settings()
    assert message.id == "toot.E002"
    assert message.msg == "TOOT[\"TRACING\"] must be True or False, not 'yes'."


def test_tracing_without_opentelemetry_is_an_error(tracing, monkeypatch):
    assert check_settings() == []
    # opentelemetry-api is a test dependency: its absence can only be pretended.
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec",
        lambda name, *a: None if name.startswith("opentelemetry") else real(name, *a),
    )
    [message] = check_settings()
    assert isinstance(message, Error)
    assert message.id == "toot.E010"
    assert "opentelemetry-api is not installed" in message.msg
    assert "django-toot[otel]" in (message.hint or "")
