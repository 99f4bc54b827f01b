from __future__ import annotations

from django.apps import AppConfig


class BenchSubscriberConfig(AppConfig):
    name = "bench.subscriber"
    label = "bench_subscriber"

    def ready(self) -> None:
        from django.conf import settings

        from bench.subscriber import copies

        copies.install(getattr(settings, "BENCH_COPIES", 1))  # bench.subscriber.settings
