from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from toot import status


class Command(BaseCommand):
    help = (
        "Make waiting retries due now: the deliveries waiting for callback URLs, the "
        "deliveries and handler runs of a channel's events, or every retry of both sides "
        "(--all)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("urls", nargs="*", help="Callback URLs whose retries are due now.")
        parser.add_argument(
            "--channel", help="Every delivery and handler run of this full channel's events."
        )
        parser.add_argument(
            "--all", action="store_true", help="Every retry: deliveries and handler runs."
        )

    def handle(
        self, *args: Any, urls: list[str], channel: str | None, all: bool, **options: Any
    ) -> None:  # noqa: A002 - the option's name
        if not (urls or channel or all):
            raise CommandError("Say which retries: callback URLs, --channel or --all.")
        count = status.retry_now(urls, channel, every=all)
        self.stdout.write(f"{count} retries due now.")
