from __future__ import annotations

from django.apps import AppConfig


class ExampleAppConfig(AppConfig):
    name = "example_app"

    def ready(self) -> None:
        from django.conf import settings

        import toot
        from example_app import handlers

        toot.subscribe("publisher", "users.updated.v1", handlers.user_updated)
        toot.subscribe("publisher", "users.deleted.v1")(handlers.user_deleted)
        # Only for the benchmark (python -m bench): see example_app/bench.py.
        copies = getattr(settings, "EXAMPLE_BENCH_COPIES", 0)  # a project setting
        if copies:
            from example_app import bench

            bench.install(copies)
