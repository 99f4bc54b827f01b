"""toot's models: how they print, and that their migrations are in step with them."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from toot.models import DeadLetter, OutboxEvent

CHANNEL = "org.example.test.users.updated.v1"


def test_a_delivery_dead_letter_prints_its_callback_url():
    letter = DeadLetter(
        kind="delivery",
        event_id="e1",
        channel=CHANNEL,
        callback_url="http://peer/cb",
    )
    assert str(letter) == f"e1 on {CHANNEL} -> http://peer/cb"


def test_a_handler_dead_letter_prints_its_handler():
    letter = DeadLetter(
        kind="handler",
        event_id="e2",
        channel=CHANNEL,
        handler="app.handlers.on_update",
    )
    assert str(letter) == f"e2 on {CHANNEL} -> app.handlers.on_update"


def test_an_outbox_event_prints_its_event_id_and_channel():
    assert (
        str(OutboxEvent(event={"id": "e3", "channel": CHANNEL, "payload": None}))
        == f"e3 on {CHANNEL}"
    )
    assert str(OutboxEvent(event={})) == "None on None"  # never raises, whatever was stored


def test_dead_letters_list_the_latest_attempt_first():
    assert DeadLetter._meta.ordering == ["-last_attempt_at"]
    assert OutboxEvent._meta.ordering == ["id"]  # the relay sends the oldest first


@pytest.mark.django_db
def test_migrations_are_in_step_with_the_models():
    out = StringIO()
    # --check exits non-zero (SystemExit) when a model change has no migration.
    call_command("makemigrations", "toot", "--check", "--dry-run", stdout=out, stderr=StringIO())
    assert "No changes detected" in out.getvalue()
