from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    """The admin's pages of what lives in Redis: models without a table, for their
    permissions."""

    dependencies = [
        ("toot", "0002_deadletter_callback_url_unindexed"),
    ]

    operations = [
        migrations.CreateModel(
            name="Overview",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
            ],
            options={
                "verbose_name": "overview",
                "verbose_name_plural": "overview",
                "managed": False,
                "default_permissions": ("view",),
            },
        ),
        migrations.CreateModel(
            name="Retry",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
            ],
            options={
                "verbose_name": "retry waiting",
                "verbose_name_plural": "retries waiting",
                "managed": False,
                "default_permissions": ("view", "change"),
            },
        ),
        migrations.CreateModel(
            name="Subscription",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
            ],
            options={
                "verbose_name": "subscription",
                "managed": False,
                "default_permissions": ("view", "delete"),
            },
        ),
    ]
