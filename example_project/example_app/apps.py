from __future__ import annotations

from django.apps import AppConfig


class ExampleAppConfig(AppConfig):
    name = "example_app"

    def ready(self) -> None:
        import toot
        from example_app import handlers

        toot.subscribe("publisher", "users.updated.v1", handlers.user_updated)
        toot.subscribe("publisher", "users.deleted.v1")(handlers.user_deleted)
