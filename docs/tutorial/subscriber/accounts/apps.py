import toot
from django.apps import AppConfig


class AccountsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "accounts"

    def ready(self) -> None:
        # Imported here, not at the top: handlers may import this app's models, which
        # Django loads only once every app's module is imported.
        from . import handlers

        toot.subscribe("publisher", "users.updated.v1", handlers.user_updated)
