from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from toot import status


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


class Command(BaseCommand):
    help = (
        "What toot holds and how its subscribers fare: queues, retries, outbox, dead "
        "letters, subscriptions and each callback URL's health; --json for a program."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print it all as JSON.")
        parser.add_argument(
            "--limit",
            type=int,
            default=50,
            help="Rows per table (default 50; 0 for all). --json prints every row.",
        )

    def handle(self, *args: Any, json: bool, limit: int, **options: Any) -> None:
        found = status.status()
        if json:
            self.stdout.write(found.as_json())
            return
        self.limit = limit
        pub, sub = found.publisher, found.subscriber
        self.stdout.write(f"toot status at {_when(found.at)}\n")
        self.stdout.write(self.style.MIGRATE_HEADING("Publisher"))
        out = pub.queue
        self.stdout.write(
            f"  out queue: {out.ready} ready, {out.held} held by {out.drains} drains, "
            f"{out.retries} retries waiting"
        )
        self.stdout.write(
            f"  callback URLs' lanes: {pub.waiting} waiting, {pub.held} held by senders"
        )
        self.stdout.write(f"  retries waiting: {pub.retries}, next due {_when(pub.next_retry)}")
        self.stdout.write(f"  outbox: {pub.outbox} events waiting for Redis")
        self._counts("  dead letters by channel", pub.dead_letters_by_channel)
        self._counts("  dead letters by callback URL", pub.dead_letters_by_url)
        channels = len({sub.channel for sub in pub.subscriptions})
        self.stdout.write(f"  subscriptions: {len(pub.subscriptions)} on {channels} channels")
        self._table(
            ["channel", "callback URL", "batch"],
            [[s.channel, s.callback_url, "yes" if s.batch else "no"] for s in pub.subscriptions],
        )
        self.stdout.write(f"  callback URLs: {len(pub.callbacks)}")
        self._table(
            [
                "callback URL",
                "circuit",
                "failures",
                "waiting",
                "in flight",
                "retries",
                "next retry",
                "last success",
                "last failure",
                "error",
            ],
            [
                [
                    c.url,
                    c.circuit,
                    str(c.failures),
                    str(c.waiting),
                    str(c.in_flight),
                    str(c.retries),
                    _when(c.next_retry),
                    _when(c.last_success),
                    _when(c.last_failure),
                    c.last_error or "-",
                ]
                for c in pub.callbacks
            ],
        )
        self.stdout.write(self.style.MIGRATE_HEADING("Subscriber"))
        self._table(
            ["queue", "ready", "held", "drains", "retries", "next retry"],
            [
                [q.name, str(q.ready), str(q.held), str(q.drains), str(q.retries)]
                + [_when(q.next_retry)]
                for q in sub.queues
            ],
        )
        self._counts("  dead letters by channel", sub.dead_letters_by_channel)
        self._counts("  dead letters by handler", sub.dead_letters_by_handler)
        totals = {
            key: sum(row[key] for row in found.minutes)
            for key in ("delivered", "failed", "handled", "handler_failed")
        }
        self.stdout.write(
            f"Last hour: {totals['delivered']} delivered, {totals['failed']} deliveries "
            f"failed, {totals['handled']} handler runs, {totals['handler_failed']} failed"
        )

    def _counts(self, title: str, counts: dict[str, int]) -> None:
        if not counts:
            self.stdout.write(f"{title}: none")
            return
        self.stdout.write(f"{title}:")
        self._table(["", "count"], [[key, str(n)] for key, n in counts.items()])

    def _table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if not rows:
            return
        shown = rows if self.limit <= 0 else rows[: self.limit]
        widths = [max(len(row[i]) for row in [header, *shown]) for i in range(len(header))]
        for row in [header, *shown]:
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            self.stdout.write("    " + line.rstrip())
        if len(shown) < len(rows):
            self.stdout.write(f"    ... and {len(rows) - len(shown)} more (--limit 0 for all)")
