from __future__ import annotations

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"

    def ready(self) -> None:
        import toot

        from . import handlers

        toot.subscribe("billing", "invoices.paid.v1", handlers.invoice_paid)
        toot.subscribe("billing", "invoices.refunded.v1", handlers.invoice_refunded)
