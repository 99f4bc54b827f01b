from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from toot.deadletters import redeliver
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

    @admin.action(description="Redeliver selected dead letters")
    def redeliver_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        delivered = failed = 0
        for letter in queryset:
            if redeliver(letter):
                delivered += 1
            else:
                failed += 1
        if delivered:
            self.message_user(request, f"{delivered} redelivered.", messages.SUCCESS)
        if failed:
            self.message_user(
                request, f"{failed} failed again; see their last error.", messages.WARNING
            )
