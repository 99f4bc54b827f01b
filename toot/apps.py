from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class TootConfig(AppConfig):
    name = "toot"
    verbose_name = "Toot"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from toot.checks import check_celery, check_security, check_settings, check_subscriptions

        checks.register(check_settings)
        checks.register(check_subscriptions)
        checks.register(check_celery)
        checks.register(check_security, checks.Tags.security)
