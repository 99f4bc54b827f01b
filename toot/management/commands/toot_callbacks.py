from __future__ import annotations

import datetime as dt
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from toot.publisher import lanes


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


class Command(BaseCommand):
    help = (
        "The publisher's callback URLs: what waits for each, its circuit breaker and rate "
        "limit; --enable a disabled one, or --disable one."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("urls", nargs="*", help="Only these callback URLs.")
        action = parser.add_mutually_exclusive_group()
        action.add_argument(
            "--enable",
            action="store_true",
            help="Close the URLs' circuits and send to them again (a disabled one included).",
        )
        action.add_argument(
            "--disable",
            action="store_true",
            help="Stop sending to the URLs; what waits for them becomes dead letters.",
        )

    def handle(
        self, *args: Any, urls: list[str], enable: bool, disable: bool, **options: Any
    ) -> None:
        if (enable or disable) and not urls:
            raise CommandError("Name the callback URLs to --enable or --disable.")
        for url in urls if enable or disable else ():
            if enable:
                lanes.enable(url)
                self.stdout.write(f"Enabled {url}")
            else:
                lanes.disable(url)
                self.stdout.write(f"Disabled {url}")
        if enable or disable:
            return
        found = lanes.status(urls)
        if not found:
            self.stdout.write("No callback URL has deliveries waiting or a circuit open.")
        for lane in found:
            rate = "-" if lane.rate is None else f"{lane.rate:g}/s"
            self.stdout.write(
                f"{lane.url}\n  circuit {lane.mode}, {lane.waiting} waiting, "
                f"{lane.in_flight} in flight, {lane.failures} failures in a row, failing "
                f"since {_when(lane.failing_since)}, open until {_when(lane.open_until)}, "
                f"rate limit {rate}"
            )
