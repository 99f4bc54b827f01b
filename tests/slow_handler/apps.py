from __future__ import annotations

from django.apps import AppConfig


class SlowHandlerConfig(AppConfig):
    name = "tests.slow_handler"
    label = "tests_slow_handler"

    def ready(self) -> None:
        from django.conf import settings

        import toot
        from tests.slow_handler import CHANNEL, handlers

        # SLOW_HANDLER_QUEUE routes its drains to a Celery queue of their own.
        toot.subscribe(
            "publisher",
            CHANNEL,
            handlers.report_requested,
            queue=getattr(settings, "SLOW_HANDLER_QUEUE", None),
        )
