from __future__ import annotations

from typing import Any

import requests
from django.core.management.base import BaseCommand, CommandError, CommandParser

from toot.exceptions import ConfigError, InvalidChannel, RegisterSubscriptionFailure
from toot.subscriber.registration import Registration, register_subscriptions


class Command(BaseCommand):
    help = "Register this app's toot subscriptions with every source it subscribes to."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="List the registrations without sending them."
        )

    def handle(self, *args: Any, dry_run: bool = False, **options: Any) -> None:
        self.dry_run = dry_run
        try:
            registrations = register_subscriptions(dry_run=dry_run, report=self.report)
        except (ConfigError, InvalidChannel) as exc:
            raise CommandError(str(exc)) from exc
        except (RegisterSubscriptionFailure, requests.RequestException) as exc:
            raise CommandError("Some subscriptions could not be registered.") from exc
        if not registrations:
            self.stdout.write("No subscriptions to register.")

    def report(self, registration: Registration) -> None:
        where = f"{registration.source}: {registration.channel} -> {registration.subscription_url}"
        if self.dry_run:
            self.stdout.write(f"{where}: would POST {registration.body}")
        elif registration.error is not None:
            self.stdout.write(self.style.ERROR(f"{where}: failed ({registration.failure})"))
        elif registration.created:
            self.stdout.write(self.style.SUCCESS(f"{where}: created"))
        else:
            self.stdout.write(f"{where}: already registered")
