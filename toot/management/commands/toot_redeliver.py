from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from toot.deadletters import Replay, redeliver
from toot.models import DeadLetter


class Command(BaseCommand):
    help = "Replay dead letters now: by id, by channel, by callback URL, or all of them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("ids", nargs="*", type=int, help="Dead letter ids.")
        parser.add_argument("--channel", help="Every dead letter of this full channel.")
        parser.add_argument("--callback-url", help="Every dead letter for this callback URL.")
        parser.add_argument("--all", action="store_true", help="Every dead letter.")

    def handle(
        self,
        *args: Any,
        ids: list[int],
        channel: str | None,
        callback_url: str | None,
        all: bool,
        **options: Any,
    ) -> None:  # noqa: A002 - the option's name
        if not (ids or channel or callback_url or all):
            raise CommandError("Say which dead letters: ids, --channel, --callback-url or --all.")
        letters = DeadLetter.objects.order_by("id")
        if ids:
            # A mistyped or already replayed id is an error, not "0 of 0": nothing is replayed.
            found = set(letters.filter(pk__in=ids).values_list("pk", flat=True))
            if missing := sorted(set(ids) - found):
                raise CommandError(
                    f"No such dead letters: {', '.join(map(str, missing))}; nothing redelivered."
                )
            letters = letters.filter(pk__in=ids)
        if channel:
            letters = letters.filter(channel=channel)
        if callback_url:
            letters = letters.filter(callback_url=callback_url)
        total = letters.count()
        counts = dict.fromkeys(Replay, 0)
        for number, letter in enumerate(letters.iterator(), start=1):
            target = letter.callback_url or letter.handler
            replay = redeliver(letter)
            counts[replay] += 1
            if replay is Replay.REDELIVERED:
                outcome = self.style.SUCCESS("delivered" if letter.callback_url else "handled")
            elif replay is Replay.GONE:
                outcome = self.style.WARNING(
                    "gone (410): not delivered, subscription and letter removed"
                )
            else:
                outcome = self.style.ERROR(
                    f"failed again ({letter.last_status or letter.last_error})"
                )
            self.stdout.write(
                f"[{number}/{total}] {letter.event_id} on {letter.channel} -> {target}: {outcome}"
            )
        summary = f"{counts[Replay.REDELIVERED]} of {total} redelivered"
        if gone := counts[Replay.GONE]:
            summary += f"; {gone} gone (410), removed undelivered"
        self.stdout.write(summary + ".")
        if failed := counts[Replay.FAILED]:
            raise CommandError(f"{failed} dead letters failed again and were kept.")
