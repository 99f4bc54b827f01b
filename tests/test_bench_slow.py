"""The benchmark's slow callback URLs (bench/slow.py): the spec, and what the server counts."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from bench.slow import SlowServer, describe, event_ids, parse_spec


@pytest.mark.parametrize(
    ("text", "delays"),
    [
        ("1x1s", [1.0]),
        ("3x3s,1xsilent", [3.0, 3.0, 3.0, None]),
        ("2x0.5s, 1x2s", [0.5, 0.5, 2.0]),
    ],
)
def test_a_spec_gives_each_url_its_delay(text, delays):
    assert parse_spec(text) == delays
    assert parse_spec(describe(delays)) == delays


def test_describe_groups_equal_delays():
    assert describe([3.0, 3.0, 3.0, None]) == "3x3s,1xsilent"


@pytest.mark.parametrize("text", ["", "1s", "0x1s", "1x0s", "1x", "2xslow", "1x1s,", "51x1s"])
def test_a_bad_spec_is_refused(text):
    with pytest.raises(ValueError):
        parse_spec(text)


def test_event_ids_of_a_single_event_and_a_batch():
    assert event_ids(b'{"id": "a", "channel": "c"}') == (["a"], False)
    assert event_ids(b'{"events": [{"id": "a"}, {"id": "b"}]}') == (["a", "b"], True)
    assert event_ids(b"not json") == ([], False)


def post(url, body, timeout=5.0):
    return requests.post(url, data=json.dumps(body), timeout=timeout)


def test_the_server_answers_late_and_counts_events_requests_and_those_in_flight():
    with_delay = SlowServer([0.3, None]).start()
    try:
        late, silent = with_delay.urls
        with_delay.expect(["a", "b", "c", "x"])
        started = time.monotonic()
        threads = [
            threading.Thread(target=post, args=(late, {"id": "a"})),
            threading.Thread(target=post, args=(late, {"events": [{"id": "b"}, {"id": "c"}]})),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert time.monotonic() - started >= 0.3
        # The silent URL holds the request until the client gives up and hangs up.
        with pytest.raises(requests.exceptions.ReadTimeout):
            post(silent, {"id": "a"}, timeout=0.3)
        deadline = time.monotonic() + 5
        while with_delay.stats()[1]["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)

        late_stats, silent_stats = with_delay.stats()
        assert late_stats | {"delay": None} == {
            "delay": None,
            "requests": 2,
            "batches": 1,
            "events": 3,
            "received": 3,
            "answered": 3,
            "expected": 4,
            "expected_received": 3,
            "expected_answered": 3,
            "hung_up": 0,
            "in_flight": 0,
            "max_in_flight": 2,
        }
        assert late_stats["delay"] == 0.3
        assert silent_stats["delay"] is None
        assert (silent_stats["requests"], silent_stats["expected_received"]) == (1, 1)
        assert (silent_stats["answered"], silent_stats["hung_up"]) == (0, 1)
        assert (silent_stats["in_flight"], silent_stats["max_in_flight"]) == (0, 1)

        with_delay.reset()
        assert with_delay.stats()[0]["requests"] == 0
        assert with_delay.stats()[0]["expected"] == 0
    finally:
        with_delay.stop()


def test_a_request_held_across_a_reset_leaves_the_new_counts_once_answered():
    server = SlowServer([0.5]).start()
    try:
        [url] = server.urls
        thread = threading.Thread(target=post, args=(url, {"id": "a"}))
        thread.start()
        deadline = time.monotonic() + 5
        while not server.stats()[0]["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        server.reset()
        assert server.stats()[0]["in_flight"] == 1
        thread.join()
        deadline = time.monotonic() + 5  # the server counts it once its reply is sent
        while server.stats()[0]["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (server.stats()[0]["in_flight"], server.stats()[0]["max_in_flight"]) == (0, 1)
    finally:
        server.stop()


def test_the_server_over_http_resets_and_expects():
    server = SlowServer([0.01]).start()
    try:
        assert requests.post(f"{server.url}/expect", json=["a"], timeout=5).status_code == 204
        assert post(server.urls[0], {"id": "a"}).status_code == 200
        assert requests.get(f"{server.url}/stats", timeout=5).json()[0]["expected_answered"] == 1
        assert requests.post(f"{server.url}/reset", timeout=5).status_code == 204
        assert requests.get(f"{server.url}/stats", timeout=5).json()[0]["answered"] == 0
        assert post(f"{server.url}/slow/1", {"id": "a"}).status_code == 404
        assert requests.get(f"{server.url}/other", timeout=5).status_code == 404
    finally:
        server.stop()
