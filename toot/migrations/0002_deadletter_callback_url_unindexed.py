from __future__ import annotations

from typing import Any

from django.db import migrations


def drop_callback_url_indexes(apps: Any, schema_editor: Any) -> None:
    """Drop whatever index an earlier 0001 put on the column (PostgreSQL made two)."""
    model = apps.get_model("toot", "DeadLetter")
    for name in schema_editor._constraint_names(model, ["callback_url"], index=True):
        schema_editor.execute(schema_editor._delete_index_sql(model, name))


class Migration(migrations.Migration):
    """DeadLetter.callback_url has no index.

    2,048 utf8mb4 characters are 8,192 bytes, over InnoDB's 3,072-byte key limit: MySQL
    refuses the index (so 0001 could not run there) and MariaDB silently cuts it to a
    prefix. Dead letters are few and rarely filtered by URL, so a scan serves better than
    a hash column would. 0001 no longer makes the index; this drops the one that an
    earlier 0001 made on a database migrated before.
    """

    dependencies = [
        ("toot", "0001_initial"),
    ]

    operations = [
        # DDL: not in a transaction, which MySQL and MariaDB cannot roll DDL back in anyway.
        migrations.RunPython(drop_callback_url_indexes, migrations.RunPython.noop, atomic=False),
    ]
