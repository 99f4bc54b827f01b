"""toot's models: how they print, and that their migrations are in step with them."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection, models
from django.db.migrations.executor import MigrationExecutor

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


@pytest.mark.django_db
def test_the_callback_url_has_no_index_after_the_migrations():
    # An index would be past InnoDB's key limit in utf8mb4, which MySQL refuses and MariaDB
    # cuts to a prefix. The other lookups keep theirs.
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, DeadLetter._meta.db_table)
    indexed = {
        tuple(constraint["columns"])
        for constraint in constraints.values()
        if constraint["index"] and not constraint["primary_key"]
    }
    assert ("callback_url",) not in indexed
    assert {("event_id",), ("channel",)} <= indexed


@pytest.mark.django_db
def test_a_callback_url_of_the_full_length_is_kept_and_found_whole():
    # 2,048 characters, some of four bytes in UTF-8: the whole of max_length on every
    # database, as toot_redeliver --callback-url filters it.
    url = "http://peer.example/cb/" + "\N{GRINNING FACE}" * 2025
    field = DeadLetter._meta.get_field("callback_url")
    assert isinstance(field, models.CharField)
    assert len(url) == field.max_length
    DeadLetter.bury({"id": "e4", "channel": CHANNEL}, 3, None, kind="delivery", callback_url=url)
    DeadLetter.bury(
        {"id": "e5", "channel": CHANNEL}, 3, None, kind="delivery", callback_url=url[:-1]
    )
    assert list(
        DeadLetter.objects.filter(callback_url=url).values_list("event_id", "callback_url")
    ) == [("e4", url)]


@pytest.mark.django_db(transaction=True)
def test_0002_drops_the_index_an_earlier_0001_made():
    """A database migrated before 0001 lost the index still has it, until 0002."""
    executor = MigrationExecutor(connection)
    executor.migrate([("toot", "0001_initial")])
    try:
        model = executor.loader.project_state([("toot", "0001_initial")]).apps.get_model(
            "toot", "DeadLetter"
        )
        with connection.schema_editor() as editor:  # what the earlier 0001 made
            editor.execute(
                editor._create_index_sql(model, fields=[model._meta.get_field("callback_url")])
            )
        assert callback_url_indexed()
        executor.loader.build_graph()
        executor.migrate([("toot", "0002_deadletter_callback_url_unindexed")])
        assert not callback_url_indexed()
    finally:
        MigrationExecutor(connection).migrate(
            MigrationExecutor(connection).loader.graph.leaf_nodes("toot")
        )


def callback_url_indexed() -> bool:
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, DeadLetter._meta.db_table)
    return any(c["index"] and c["columns"] == ["callback_url"] for c in constraints.values())
