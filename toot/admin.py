"""toot in the Django admin: dead letters and the outbox (database rows), and pages of what
lives in Redis (subscriptions, retries waiting, an overview with a chart of the last hour),
each behind its model's permissions (``toot.models``). Every action is a POST, under the
admin's CSRF protection, and is refused without its permission.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe
from django.utils.text import capfirst

from toot import signals, status
from toot.deadletters import requeue
from toot.models import DeadLetter, OutboxEvent, Overview, Retry, Subscription
from toot.publisher import lanes, store

if TYPE_CHECKING:
    ModelAdmin = admin.ModelAdmin[Any]
else:
    ModelAdmin = admin.ModelAdmin

logger = logging.getLogger(__name__)
# Rows a Redis page shows at most: the rest is for toot_status --json.
PAGE_ROWS = 500


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

    @admin.action(description="Redeliver selected dead letters", permissions=["change"])
    def redeliver_selected(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        count = requeue(list(queryset))
        self.message_user(
            request,
            f"{count} queued to be redelivered by a worker; one that fails again is a dead "
            "letter again.",
            messages.SUCCESS,
        )


@admin.register(OutboxEvent)
class OutboxEventAdmin(ModelAdmin):
    """Read only: the relay moves each row onto the queue once Redis answers."""

    list_display = ["id", "__str__", "created_at", "claimed_at"]
    readonly_fields = ["event", "created_at", "claim", "claimed_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


class RedisPage(ModelAdmin):
    """A page of what toot keeps in Redis, in place of a model's changelist."""

    template = ""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return self._allowed(request, "change")

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return self._allowed(request, "delete")

    def _allowed(self, request: HttpRequest, action: str) -> bool:
        opts = self.opts
        if action not in opts.default_permissions:
            return False
        return request.user.has_perm(f"{opts.app_label}.{action}_{opts.model_name}")

    def get_urls(self) -> list[Any]:
        from django.urls import path

        view = self.admin_site.admin_view(self.changelist_view)
        info = self.opts.app_label, self.opts.model_name
        return [path("", view, name="{}_{}_changelist".format(*info))]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            self.act(request)
            return HttpResponseRedirect(request.get_full_path())
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": capfirst(self.opts.verbose_name_plural),
            **self.page(request),
            **(extra_context or {}),
        }
        return TemplateResponse(request, self.template, context)

    def page(self, request: HttpRequest) -> dict[str, Any]:
        return {}

    def act(self, request: HttpRequest) -> None:
        raise PermissionDenied


def _health(urls: list[str]) -> dict[str, status.CallbackHealth]:
    return {health.url: health for health in status.callbacks([], urls)}


@admin.register(Subscription)
class SubscriptionAdmin(RedisPage):
    template = "admin/toot/subscriptions.html"

    def page(self, request: HttpRequest) -> dict[str, Any]:
        query = request.GET.get("q", "").strip()
        channel = request.GET.get("channel", "")
        every = status.subscriptions()
        channels = sorted({sub.channel for sub in every})
        shown = [
            sub
            for sub in every
            if (not channel or sub.channel == channel)
            and (not query or query in sub.channel or query in sub.callback_url)
        ]
        health = _health(sorted({sub.callback_url for sub in shown[:PAGE_ROWS]}))
        return {
            "query": query,
            "channel": channel,
            "channels": channels,
            "total": len(every),
            "count": len(shown),
            "rows": [(sub, health[sub.callback_url]) for sub in shown[:PAGE_ROWS]],
            "can_remove": self.has_delete_permission(request),
        }

    def act(self, request: HttpRequest) -> None:
        if not self.has_delete_permission(request):
            raise PermissionDenied
        channel, url = request.POST.get("channel", ""), request.POST.get("callback_url", "")
        if store.remove(channel, url):
            logger.info(
                "Subscription %s to %s removed in the admin by %s", url, channel, request.user
            )
            signals.send(
                signals.subscription_removed,
                Subscription,
                f"Subscription {url} to {channel}",
                channel=channel,
                callback_url=url,
                reason="admin",
            )
            self.message_user(request, f"{url} unsubscribed from {channel}.", messages.SUCCESS)
        else:
            self.message_user(request, f"{url} was not subscribed to {channel}.", messages.WARNING)


@admin.register(Retry)
class RetryAdmin(RedisPage):
    template = "admin/toot/retries.html"

    def page(self, request: HttpRequest) -> dict[str, Any]:
        url, channel = request.GET.get("url", "").strip(), request.GET.get("channel", "").strip()
        urls = [u for u in lanes.index()[0] if url in u]
        found = sorted(_health(urls).values(), key=lambda health: health.next_retry or status.EPOCH)
        channels = sorted({sub.channel for sub in status.subscriptions()})
        waiting: list[dict[str, Any]] = []
        if channel:
            waiting = [item for item in status.retries_of(urls) if item["channel"] == channel]
        return {
            "url": url,
            "channel": channel,
            "channels": channels,
            "rows": found[:PAGE_ROWS],
            "count": len(found),
            "total": sum(health.retries for health in found),
            "items": waiting[:PAGE_ROWS],
            "item_count": len(waiting),
            "can_retry": self.has_change_permission(request),
        }

    def act(self, request: HttpRequest) -> None:
        if not self.has_change_permission(request):
            raise PermissionDenied
        urls, channel = request.POST.getlist("url"), request.POST.get("channel") or None
        every = request.POST.get("all") == "1"
        count = status.retry_now(urls if not every else None, channel, every=every)
        self.message_user(
            request,
            f"{count} retries due now; a worker sends them at each callback URL's pace.",
            messages.SUCCESS,
        )


@admin.register(Overview)
class OverviewAdmin(RedisPage):
    template = "admin/toot/overview.html"

    def page(self, request: HttpRequest) -> dict[str, Any]:
        found = status.status()
        return {
            "status": found,
            "chart": chart(found.minutes),
            "failing": [
                url for url in found.publisher.callbacks if url.failures or url.circuit != "closed"
            ],
        }


# The overview's chart: one line per count, a point per minute.
SERIES = [
    ("delivered", "deliveries", "#417690"),
    ("failed", "failed deliveries", "#ba2121"),
    ("handled", "handler runs", "#2e7d32"),
]
WIDTH, HEIGHT, MARGIN = 720, 200, 40


def chart(minutes: list[dict[str, Any]]) -> SafeString:
    """An inline SVG of ``minutes`` (deliveries, failures and handler runs per minute)."""
    top = max([1, *(row[key] for row in minutes for key, _, _ in SERIES)])
    step = (WIDTH - 2 * MARGIN) / max(1, len(minutes) - 1)

    def y(value: int) -> float:
        return float(HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * value / top)

    parts = [
        format_html(
            '<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" role="img" '
            'aria-label="per minute, the last hour" class="toot-chart">',
            WIDTH,
            HEIGHT,
        ),
        format_html(
            '<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999"/>'
            '<text x="4" y="{}" font-size="11">{}</text><text x="4" y="{}" font-size="11">0</text>',
            MARGIN,
            HEIGHT - MARGIN,
            WIDTH - MARGIN,
            HEIGHT - MARGIN,
            MARGIN,
            top,
            HEIGHT - MARGIN,
        ),
    ]
    for index, (key, label, colour) in enumerate(SERIES):
        points = " ".join(
            f"{MARGIN + i * step:.1f},{y(row[key]):.1f}" for i, row in enumerate(minutes)
        )
        parts.append(
            format_html(
                '<polyline fill="none" stroke="{}" stroke-width="2" points="{}" '
                'data-series="{}"/><text x="{}" y="{}" font-size="12" fill="{}">{}: {}</text>',
                colour,
                points,
                key,
                MARGIN + index * 200,
                HEIGHT - 10,
                colour,
                label,
                sum(row[key] for row in minutes),
            )
        )
    parts.append(mark_safe("</svg>"))
    return mark_safe("".join(parts))  # each part escaped above
