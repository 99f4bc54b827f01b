"""The event and its wire form (docs/protocol.md sections 2 and 3)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from types import MappingProxyType

import pytest
from django.test import override_settings
from django.utils import timezone

from toot import Event, InvalidEvent, TootError
from toot.protocol.events import parse_timestamp

CHANNEL = "org.example.publisher.users.updated.v1"
UTC = dt.timezone.utc
CDT = dt.timezone(dt.timedelta(hours=-5))
INSTANT = dt.datetime(2015, 10, 23, 16, 50, 9, tzinfo=UTC)


def make_event(**kwargs):
    return Event(
        CHANNEL,
        {"key": "value", "list": [1, 2.5, None, True], "nested": {"a": "é"}},
        id="8a1f5b52-6c4e-4f57-9a55-3f3f2f6b1c11",
        timestamp=dt.datetime(2015, 10, 23, 11, 50, 9, 123000, tzinfo=CDT),
        **kwargs,
    )


def assert_same_event(left, right):
    assert (left.id, left.channel, left.payload, left.timestamp) == (
        right.id,
        right.channel,
        right.payload,
        right.timestamp,
    )


# Construction and the wire form ------------------------------------------------------


def test_new_event_gets_a_uuid4_id_and_the_current_aware_time():
    before = timezone.now()
    event = Event(CHANNEL, {"key": 1})
    after = timezone.now()

    assert uuid.UUID(event.id).version == 4
    assert event.timestamp.utcoffset() is not None
    assert before <= event.timestamp <= after
    assert event.channel == CHANNEL
    assert event.payload == {"key": 1}


@override_settings(USE_TZ=False, TIME_ZONE="America/Chicago")
def test_a_project_without_time_zone_support_still_sends_the_instant_with_an_offset():
    # Django's timezone.now() is naive local time there, which peers would read as UTC.
    wire = Event(CHANNEL).to_dict()["timestamp"]

    sent = dt.datetime.fromisoformat(wire)
    assert sent.utcoffset() is not None
    assert abs(sent - dt.datetime.now(UTC)) < dt.timedelta(minutes=1)


def test_new_events_get_different_ids():
    assert Event(CHANNEL).id != Event(CHANNEL).id


def test_payload_defaults_to_none():
    assert Event(CHANNEL).payload is None


def test_to_dict_is_the_wire_form():
    assert make_event().to_dict() == {
        "id": "8a1f5b52-6c4e-4f57-9a55-3f3f2f6b1c11",
        "timestamp": "2015-10-23T11:50:09.123000-05:00",
        "payload": {"key": "value", "list": [1, 2.5, None, True], "nested": {"a": "é"}},
        "channel": CHANNEL,
    }


def test_to_dict_of_a_utc_time_keeps_its_offset():
    event = Event(CHANNEL, timestamp=INSTANT)

    assert event.to_dict()["timestamp"] == "2015-10-23T16:50:09+00:00"


def test_to_json_is_compact_json_of_to_dict():
    event = make_event()
    wire = event.to_json()

    assert json.loads(wire) == event.to_dict()
    assert ", " not in wire and ": " not in wire


def test_round_trip_through_to_dict():
    event = make_event()

    assert_same_event(Event.from_dict(event.to_dict()), event)


def test_round_trip_through_to_json():
    event = make_event()

    rebuilt = Event.from_dict(json.loads(event.to_json()))

    assert_same_event(rebuilt, event)
    assert rebuilt.timestamp.utcoffset() == dt.timedelta(hours=-5)


def test_round_trip_of_a_new_event_keeps_the_instant():
    event = Event(CHANNEL, [1, "two"])

    rebuilt = Event.from_dict(json.loads(event.to_json()))

    assert_same_event(rebuilt, event)


@pytest.mark.parametrize("payload", [None, 0, "text", [1, 2], {"a": {"b": [None]}}, True])
def test_any_json_payload_round_trips(payload):
    assert Event.from_dict(json.loads(Event(CHANNEL, payload).to_json())).payload == payload


def test_from_dict_accepts_any_mapping():
    event = Event.from_dict(MappingProxyType({"channel": CHANNEL, "payload": 1}))

    assert (event.channel, event.payload) == (CHANNEL, 1)


def test_from_dict_ignores_unknown_fields():
    event = Event.from_dict({**make_event().to_dict(), "extra": "ignored", "batch": True})

    assert_same_event(event, make_event())


def test_from_dict_makes_up_a_missing_id_and_timestamp():
    before = timezone.now()
    event = Event.from_dict({"channel": CHANNEL})

    assert uuid.UUID(event.id).version == 4
    assert before <= event.timestamp <= timezone.now()
    assert event.payload is None


def test_from_dict_makes_up_a_null_id_and_timestamp():
    event = Event.from_dict({"channel": CHANNEL, "id": None, "timestamp": None})

    assert event.id
    assert event.timestamp.utcoffset() is not None


def test_from_dict_accepts_any_non_empty_string_id():
    assert Event.from_dict({"channel": CHANNEL, "id": "42"}).id == "42"
    assert Event.from_dict({"channel": CHANNEL, "id": "x" * 255}).id == "x" * 255


def test_repr_names_id_and_channel():
    assert repr(make_event()) == f"<Event 8a1f5b52-6c4e-4f57-9a55-3f3f2f6b1c11 on {CHANNEL}>"


# Equality, hash, item access -----------------------------------------------------------


def test_events_with_the_same_id_are_equal_whatever_else_differs():
    first = Event(CHANNEL, {"a": 1}, id="same", timestamp=INSTANT)
    second = Event("org.example.other.v1", {"b": 2}, id="same")

    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1


def test_events_with_different_ids_differ():
    first = Event(CHANNEL, {"a": 1}, id="one", timestamp=INSTANT)
    second = Event(CHANNEL, {"a": 1}, id="two", timestamp=INSTANT)

    assert first != second
    assert len({first, second}) == 2


def test_a_rebuilt_event_equals_the_original():
    event = Event(CHANNEL, {"a": 1})

    assert Event.from_dict(event.to_dict()) == event


@pytest.mark.parametrize("other", ["same", {"id": "same"}, None, 1])
def test_an_event_never_equals_something_that_is_not_an_event(other):
    event = Event(CHANNEL, id="same")

    assert event != other
    assert other != event
    assert event.__eq__(other) is NotImplemented


def test_getitem_reads_the_payload():
    event = Event(CHANNEL, {"key": "value", "n": 0})

    assert event["key"] == "value"
    assert event["n"] == 0


def test_getitem_of_a_missing_key_raises_key_error():
    with pytest.raises(KeyError):
        Event(CHANNEL, {"key": "value"})["other"]


# parse_timestamp ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "offset_hours"),
    [
        pytest.param("2015-10-23 11:50:09 -0500", -5, id="ruby"),
        pytest.param("2015-10-24 01:50:09 +0900", 9, id="ruby-east"),
        pytest.param("2015-10-23 16:50:09 +0000", 0, id="ruby-utc"),
        pytest.param("2015-10-23T11:50:09.000-05:00", -5, id="rails-iso"),
        pytest.param("2015-10-23T11:50:09-05:00", -5, id="iso-offset"),
        pytest.param("2015-10-23T11:50:09-0500", -5, id="iso-offset-no-colon"),
        pytest.param("2015-10-23T16:50:09Z", 0, id="z"),
        pytest.param("2015-10-23T16:50:09.000Z", 0, id="z-millis"),
        pytest.param("2015-10-23T16:50:09", 0, id="naive-iso-is-utc"),
        pytest.param("2015-10-23 16:50:09", 0, id="naive-space-is-utc"),
        pytest.param("  2015-10-23T16:50:09Z \n", 0, id="surrounding-whitespace"),
    ],
)
def test_parse_timestamp_forms(value, offset_hours):
    parsed = parse_timestamp(value)

    assert parsed == INSTANT
    assert parsed.utcoffset() == dt.timedelta(hours=offset_hours)


def test_parse_timestamp_keeps_microseconds():
    parsed = parse_timestamp("2015-10-23T16:50:09.123456+00:00")

    assert parsed == INSTANT.replace(microsecond=123456)


def test_parse_timestamp_reads_what_to_dict_writes():
    event = Event(CHANNEL)

    assert parse_timestamp(event.to_dict()["timestamp"]) == event.timestamp


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("garbage", id="garbage"),
        pytest.param("yesterday at noon", id="words"),
        pytest.param("1445619009", id="epoch-seconds"),
        pytest.param("23/10/2015 11:50", id="day-first"),
        pytest.param("2015-10-23T11:50:09 EST", id="zone-name"),
        pytest.param("2015-13-01T00:00:00", id="month-13"),
        pytest.param("2015-02-30 00:00:00", id="february-30"),
        pytest.param("2015-10-23T25:00:00Z", id="hour-25"),
        pytest.param("2015-10-23T11:61:00Z", id="minute-61"),
        pytest.param("2015-10-23 11:50:09 +9900", id="offset-99h"),
        pytest.param("2015-10-23 11:50:09 +2400", id="offset-24h"),
        pytest.param("0000-01-01T00:00:00Z", id="year-0"),
    ],
)
def test_parse_timestamp_refuses(value):
    with pytest.raises(InvalidEvent, match="timestamp is not a date and time"):
        parse_timestamp(value)


def test_parse_timestamp_error_quotes_only_the_start_of_a_long_value():
    value = "not a time " + "x" * 10_000

    with pytest.raises(InvalidEvent) as excinfo:
        parse_timestamp(value)

    message = str(excinfo.value)
    assert repr(value[:64]) in message
    assert len(message) < 200


def test_invalid_event_is_a_toot_error_and_a_value_error():
    with pytest.raises(TootError):
        parse_timestamp("garbage")
    with pytest.raises(ValueError):
        parse_timestamp("garbage")


# from_dict errors ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, [], [{"channel": CHANNEL}], "text", 5, 1.5, True])
def test_from_dict_of_a_non_mapping_is_refused(data):
    with pytest.raises(InvalidEvent, match="event must be a JSON object"):
        Event.from_dict(data)


@pytest.mark.parametrize("data", [{}, {"id": "x", "payload": {"channel": CHANNEL}}])
def test_from_dict_without_channel_is_refused(data):
    with pytest.raises(InvalidEvent, match="channel is missing"):
        Event.from_dict(data)


@pytest.mark.parametrize(
    ("channel", "error"),
    [
        pytest.param(None, "channel must be a string", id="null"),
        pytest.param(5, "channel must be a string", id="number"),
        pytest.param([CHANNEL], "channel must be a string", id="array"),
        pytest.param(b"org.example", "channel must be a string", id="bytes"),
        pytest.param("", "channel must not be empty", id="empty"),
        pytest.param("c" * 256, "channel is longer than 255 characters", id="256"),
        pytest.param(CHANNEL + " x", "printable ASCII", id="space"),
        pytest.param(CHANNEL + "\n", "printable ASCII", id="newline"),
        pytest.param(CHANNEL + "é", "printable ASCII", id="non-ascii"),
    ],
)
def test_from_dict_with_a_bad_channel_is_refused(channel, error):
    with pytest.raises(InvalidEvent, match=error):
        Event.from_dict({"channel": channel})


@pytest.mark.parametrize(
    ("event_id", "error"),
    [
        pytest.param(5, "id must be a non-empty string", id="number"),
        pytest.param(0, "id must be a non-empty string", id="zero"),
        pytest.param(True, "id must be a non-empty string", id="bool"),
        pytest.param(False, "id must be a non-empty string", id="false"),
        pytest.param("", "id must be a non-empty string", id="empty"),
        pytest.param(["x"], "id must be a non-empty string", id="array"),
        pytest.param({"id": "x"}, "id must be a non-empty string", id="object"),
        pytest.param("x" * 256, "id is longer than 255 characters", id="256"),
        pytest.param("an id", "id may hold only printable ASCII", id="space"),
        pytest.param("id\n", "id may hold only printable ASCII", id="newline"),
        pytest.param("\ud800", "id may hold only printable ASCII", id="lone-surrogate"),
    ],
)
def test_from_dict_with_a_bad_id_is_refused(event_id, error):
    with pytest.raises(InvalidEvent, match=error):
        Event.from_dict({"channel": CHANNEL, "id": event_id})


@pytest.mark.parametrize("timestamp", [1445619009, 1445619009.5, ["2015-10-23"], {"t": 1}, True])
def test_from_dict_with_a_non_string_timestamp_is_refused(timestamp):
    with pytest.raises(InvalidEvent, match="timestamp must be a string"):
        Event.from_dict({"channel": CHANNEL, "timestamp": timestamp})


def test_from_dict_with_an_unparsable_timestamp_is_refused():
    with pytest.raises(InvalidEvent, match="timestamp is not a date and time"):
        Event.from_dict({"channel": CHANNEL, "timestamp": "2015-13-01T00:00:00Z"})
