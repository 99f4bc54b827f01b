"""The event: what a publisher sends and what a handler receives."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from django.utils import timezone
from django.utils.dateparse import parse_datetime

from toot.exceptions import InvalidEvent
from toot.protocol.validation import CHANNEL_RE, channel_error


def parse_timestamp(value: str) -> dt.datetime:
    """Parse the timestamp forms peers send into an aware datetime.

    Ruby without ActiveSupport sends ``2015-10-23 11:50:09 -0500``; Rails sends ISO 8601
    with an offset; other peers send ``Z`` or naive ISO forms, which are taken as UTC.
    Django's parser accepts all of these.
    """
    try:
        parsed = parse_datetime(value.strip())
    except ValueError:  # well formed but out of range, e.g. month 13
        parsed = None
    if parsed is None:
        raise InvalidEvent(f"timestamp is not a date and time: {value[:64]!r}")
    if timezone.is_naive(parsed):
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed


def wire_json(wire: dict[str, Any], encoder: type[json.JSONEncoder] | None = None) -> str:
    """An event's wire form as sent: compact, ASCII only, and no NaN no peer can read.

    ``encoder`` turns what JSON has no type for (a datetime, a Decimal) into JSON.
    """
    return json.dumps(wire, separators=(",", ":"), allow_nan=False, cls=encoder)


def batch_body(encoded: Iterable[str]) -> bytes:
    """A batch's body, ``{"events": [...]}``, around events already in their wire JSON."""
    return ('{"events":[' + ",".join(encoded) + "]}").encode()


# A batch's body stays under this, well below Django's DATA_UPLOAD_MAX_MEMORY_SIZE
# default (2.5 MB); an event larger than this alone goes in a batch of its own.
BATCH_MAX_BYTES = 1024 * 1024
BATCH_WRAPPER_BYTES = len(batch_body([]))


class Event:
    """One published event. Two events are equal when their ids are equal."""

    __slots__ = ("id", "timestamp", "channel", "payload")

    def __init__(
        self,
        channel: str,
        payload: Any = None,
        *,
        id: str | None = None,  # noqa: A002 - the protocol's field name
        timestamp: dt.datetime | None = None,
    ) -> None:
        self.id = id or str(uuid.uuid4())
        # Not timezone.now(): without USE_TZ that is naive local time, read as UTC by peers.
        self.timestamp = timestamp or dt.datetime.now(dt.timezone.utc)
        self.channel = channel
        self.payload = payload

    def __getitem__(self, key: str) -> Any:
        return self.payload[key]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self.id == other.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<Event {self.id} on {self.channel}>"

    def to_dict(self) -> dict[str, Any]:
        """The wire form (docs/protocol.md section 2), timestamp in ISO 8601 with an offset."""
        return {
            "id": self.id,
            "timestamp": self.timestamp.isoformat(),
            "payload": self.payload,
            "channel": self.channel,
        }

    def to_json(self) -> str:
        return wire_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: object) -> Event:
        """Rebuild an event from its wire form, raising InvalidEvent with the reason.

        Like the Ruby gem, a missing ``id`` or ``timestamp`` is made up; unlike it, a
        missing ``channel`` is refused.
        """
        if not isinstance(data, Mapping):
            raise InvalidEvent("event must be a JSON object")
        if "channel" not in data:
            raise InvalidEvent("channel is missing")
        error = channel_error(data["channel"])
        if error:
            raise InvalidEvent(error)
        event_id = data.get("id")
        if event_id is not None and (not isinstance(event_id, str) or not event_id):
            raise InvalidEvent("id must be a non-empty string")
        if event_id is not None and len(event_id) > 255:
            raise InvalidEvent("id is longer than 255 characters")
        if event_id is not None and not CHANNEL_RE.fullmatch(event_id):
            # Ids end up in Redis keys and log lines, like channel names.
            raise InvalidEvent("id may hold only printable ASCII characters without spaces")
        timestamp = data.get("timestamp")
        if timestamp is not None and not isinstance(timestamp, str):
            raise InvalidEvent("timestamp must be a string")
        return cls(
            data["channel"],
            data.get("payload"),
            id=event_id,
            timestamp=parse_timestamp(timestamp) if timestamp is not None else None,
        )
