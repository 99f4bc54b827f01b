"""toot's Prometheus metrics (toot.metrics) with the real prometheus_client: in this
process, through the real pipeline (the suite's worker, a live server, real HTTP peers);
and across real processes (tests/test_metrics_processes.py), where multiprocess mode adds
up what gunicorn's and Celery's workers counted."""

from __future__ import annotations

import uuid

import pytest
from celery.worker import state as worker_state
from django.conf import settings
from django.test import override_settings
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import toot
from tests.http_server import HTTPServer, Reply
from tests.utils import redis_down, retry_item, toot_settings
from toot import metrics
from toot.checks import check_settings
from toot.engine import queue
from toot.engine.connection import get_redis
from toot.protocol.events import Event, wire_json
from toot.publisher import lanes, store
from toot.subscriber import handling
from toot.subscriber.registry import subscribe

SOURCE_PREFIX = "org.example.publisher."


@pytest.fixture
def metrics_on():
    with toot_settings(METRICS=True):
        yield


@pytest.fixture
def suffix():
    return f"metrics.{uuid.uuid4().hex[:8]}.v1"


def value(name: str, **labels: str) -> float:
    """A sample of this process's default registry; 0 when it was never counted."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(client) -> dict[str, float]:
    """What the metrics view serves, by sample name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[key] = sample.value
    return samples


# The whole path, counted -----------------------------------------------------------------


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_an_event_s_path_is_counted_on_both_sides(
    worker, live_server, eventually, metrics_on, suffix, batch
):
    subscribe("publisher", suffix, lambda event: None)
    channel = SOURCE_PREFIX + suffix
    store.add(channel, f"{live_server.url}/toot/callbacks", batch=batch)
    [name] = handling.handlers_by_name(channel)

    for n in range(3):
        toot.publish(suffix, {"n": n}, prefix=SOURCE_PREFIX)

    eventually(
        lambda: value("toot_events_handled_total", channel=channel, handler=name) == 3,
        what="three handler runs counted",
    )
    eventually(lambda: value("toot_events_delivered_total", channel=channel) == 3)
    assert value("toot_events_published_total", channel=channel) == 3
    assert value("toot_events_received_total", channel=channel) == 3
    requests = value("toot_delivery_duration_seconds_count", channel=channel)
    assert 1 <= requests <= 3  # one per request: a batch carries one or more
    assert value("toot_delivery_duration_seconds_sum", channel=channel) > 0
    assert value("toot_handler_duration_seconds_count", channel=channel, handler=name) == 3
    assert value("toot_publish_to_handled_seconds_count", channel=channel) == 3
    # Handled within seconds: every observation falls in the 10 s bucket.
    assert value("toot_publish_to_handled_seconds_bucket", channel=channel, le="10.0") == 3
    for failure in ("toot_deliveries_failed_total", "toot_handler_failures_total"):
        assert not [
            s
            for m in REGISTRY.collect()
            for s in m.samples
            if s.name == failure and s.labels.get("channel") == channel
        ]


@pytest.mark.django_db(transaction=True)  # the worker writes the dead letters meanwhile
def test_failed_deliveries_are_counted_by_status_class_then_dead_lettered(
    worker, eventually, metrics_on, suffix, settings
):
    attempts = 1 + len(settings.TOOT["RETRY_SCHEDULE"])
    failing, silent = "org.example.test.5xx." + suffix, "org.example.test.none." + suffix
    with HTTPServer(Reply(503, body=b"down")) as peer:
        store.add(failing, peer.url)
        with HTTPServer() as gone:
            store.add(silent, gone.url)  # nobody listens there any more

        toot.publish("5xx." + suffix, {"id": 1})
        toot.publish("none." + suffix, {"id": 2})

        for channel in (failing, silent):
            eventually(
                lambda channel=channel: (
                    value("toot_events_dead_lettered_total", channel=channel, kind="delivery") == 1
                ),
                what=f"the dead letter of {channel}",
            )
    failed = "toot_deliveries_failed_total"
    assert value(failed, channel=failing, status_class="5xx") == attempts
    assert value(failed, channel=silent, status_class="none") == attempts
    assert value("toot_delivery_duration_seconds_count", channel=failing) == attempts
    assert value("toot_events_delivered_total", channel=failing) == 0


@pytest.mark.django_db(transaction=True)
def test_a_failing_handler_is_counted_at_each_attempt_then_dead_lettered(
    worker, live_server, eventually, metrics_on, suffix, settings
):
    def broken(event):
        raise ValueError("no")

    subscribe("publisher", suffix, broken)
    channel = SOURCE_PREFIX + suffix
    store.add(channel, f"{live_server.url}/toot/callbacks")
    [name] = handling.handlers_by_name(channel)
    attempts = 1 + len(settings.TOOT["RETRY_SCHEDULE"])

    toot.publish(suffix, {"id": 7}, prefix=SOURCE_PREFIX)

    eventually(
        lambda: value("toot_events_dead_lettered_total", channel=channel, kind="handler") == 1,
        what="the handler's dead letter",
    )
    assert value("toot_handler_failures_total", channel=channel, handler=name) == attempts
    assert value("toot_handler_duration_seconds_count", channel=channel, handler=name) == attempts
    assert value("toot_events_handled_total", channel=channel, handler=name) == 0
    assert value("toot_publish_to_handled_seconds_count", channel=channel) == 0


# Switched off ----------------------------------------------------------------------------


def receivers_of_metrics() -> list[str]:
    uids = {f"toot.metrics.{receiver.__name__}" for _, receiver in metrics.RECEIVERS}
    # Each entry starts with its lookup key, (dispatch_uid, sender's id).
    keys = [entry[0] for signal, _ in metrics.RECEIVERS for entry in signal.receivers]
    return [key[0] for key in keys if key[0] in uids]


def test_off_by_default_connects_no_receiver_and_serves_404(client):
    assert receivers_of_metrics() == []
    assert client.get("/metrics").status_code == 404


def test_switching_on_connects_each_receiver_once_and_off_again():
    with toot_settings(METRICS=True):
        assert len(receivers_of_metrics()) == len(metrics.RECEIVERS)
        metrics.setup()  # again, as a second ready() would: still once
        assert len(receivers_of_metrics()) == len(metrics.RECEIVERS)
    assert receivers_of_metrics() == []


def test_an_event_published_with_metrics_off_is_not_counted(redis, suffix):
    toot.publish(suffix, {"id": 1})
    assert value("toot_events_published_total", channel="org.example.test." + suffix) == 0


# The view ----------------------------------------------------------------------------------


def test_the_view_serves_counters_and_the_queue_gauges_read_from_redis(
    client, celery_worker, eventually, suffix
):
    channel = "org.example.test." + suffix
    url = "http://127.0.0.1:9/hook"
    # Queues of the test's own (override_settings reaches every thread).
    prefix = f"{settings.TOOT['KEY_PREFIX']}{uuid.uuid4().hex[:8]}:"

    def no_drain_at_work():  # as the conftest's fixture, after the publish's drain
        queued = settings.CELERY_TASK_DEFAULT_QUEUE
        idle = lambda: not (worker_state.requests or get_redis().llen(queued))  # noqa: E731
        eventually(idle, what="the worker's drains to end")

    with toot_settings(METRICS=True):
        toot.publish(suffix, {"id": 1})
    no_drain_at_work()
    with toot_settings(METRICS=True, KEY_PREFIX=prefix):
        lanes.renew("test-pool")
        lanes.push({url: (False, ["S" + wire_json(Event(channel, {}).to_dict())])})
        claimed = lanes.claim("test-pool", queue.new_id(), None)
        assert claimed is not None and claimed.claim is not None
        ended = claimed.claim  # failed, its two items retried in five minutes
        ended.outcome, ended.failure, ended.failed = lanes.FAILED, "status 503", 1
        ended.retries = [(retry_item(url, channel, n), 300.0) for n in range(2)]
        lanes.claim("test-pool", queue.new_id(), ended, take=False)

        samples = scrape(client)

    assert samples[f"toot_events_published_total,channel={channel}"] == 1
    assert samples["toot_redis_up"] == 1
    assert samples["toot_retries_waiting,queue=deliveries"] == 2
    assert samples["toot_queue_depth,queue=deliveries"] == 0
    for name in ("out", "in"):  # what the out queue holds depends on the tests' worker
        assert f"toot_queue_depth,queue={name}" in samples
        assert samples[f"toot_retries_waiting,queue={name}"] == 0
    # Outside multiprocess mode, the default registry's own collectors come along.
    assert "python_info" in {key.split(",")[0] for key in samples}


def test_the_view_answers_while_redis_is_down(client, metrics_on):
    with redis_down():
        samples = scrape(client)
    assert samples["toot_redis_up"] == 0
    assert not [key for key in samples if key.startswith("toot_queue_depth")]


def test_the_view_speaks_openmetrics_to_a_scraper_that_asks(client, metrics_on, redis):
    response = client.get("/metrics", HTTP_ACCEPT="application/openmetrics-text")
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.endswith(b"# EOF\n")


def test_the_view_takes_only_get(client, metrics_on):
    assert client.post("/metrics").status_code == 405


def test_status_classes():
    assert [metrics.status_class(s) for s in (200, 302, 410, 503, None, 99)] == [
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "none",
        "none",
    ]


# Checks --------------------------------------------------------------------------------------


def test_e009_metrics_on_without_prometheus_client(monkeypatch):
    # The one stand-in: prometheus_client is installed for the suite.
    monkeypatch.setattr(metrics, "available", lambda: False)
    with toot_settings(METRICS=True):
        [message] = check_settings()
        assert receivers_of_metrics() == []  # nothing connected that would fail
    assert message.id == "toot.E011"
    assert message.hint is not None and "prometheus" in message.hint


def test_metrics_must_be_a_bool():
    with toot_settings(METRICS="yes"):
        [message] = check_settings()
        assert receivers_of_metrics() == []
    assert message.id == "toot.E002"
    assert 'TOOT["METRICS"] must be True or False' in message.msg


def test_metrics_on_passes_the_checks():
    with toot_settings(METRICS=True):
        assert check_settings() == []


def test_the_docs_urls_serve_the_metrics(client, metrics_on, redis):
    with override_settings(ROOT_URLCONF="docs.examples.metrics_urls"):
        samples = scrape(client)
    assert samples["toot_redis_up"] == 1


def test_the_metrics_page_shows_the_files_these_tests_run():
    from tests.test_docs import DOCS, directives

    included = [
        d.argument
        for d in directives((DOCS / "metrics.md").read_text())
        if d.name == "literalinclude"
    ]
    # metrics_urls.py above; the other two in tests/test_metrics_processes.py.
    assert included == [
        "examples/metrics_urls.py",
        "examples/metrics_gunicorn.py",
        "examples/metrics_celery.py",
    ]
