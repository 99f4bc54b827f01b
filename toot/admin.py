from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from toot.deadletters import Replay, redeliver
from toot.models import DeadLetter

if TYPE_CHECKING:
    ModelAdmin = admin.ModelAdmin[DeadLetter]
else:
    ModelAdmin = admin.ModelAdmin


@admin.register(DeadLetter)
class DeadLetterAdmin(ModelAdmin):
    list_display = [
        "event_id",
        "channel",
        "kind",
        "callback_url",
        "handler",
        "attempts",
        "last_status",
        "last_attempt_at",
    ]
    list_filter = ["kind", "channel", "last_status", "callback_url"]
    search_fields = ["event_id", "channel", "callback_url", "handler"]
    date_hierarchy = "last_attempt_at"
    readonly_fields = [field.name for field in DeadLetter._meta.fields]
    actions = ["redeliver_selected"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Dead letters are made by toot only: with every field read-only, an add would fail."""
        return False

    @admin.action(description="Redeliver selected dead letters")
    def redeliver_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        counts = dict.fromkeys(Replay, 0)
        for letter in queryset:
            counts[redeliver(letter)] += 1
        if delivered := counts[Replay.REDELIVERED]:
            self.message_user(request, f"{delivered} redelivered.", messages.SUCCESS)
        if gone := counts[Replay.GONE]:
            self.message_user(request, f"{gone} gone (410), removed undelivered.", messages.WARNING)
        if failed := counts[Replay.FAILED]:
            self.message_user(
                request, f"{failed} failed again; see their last error.", messages.WARNING
            )
