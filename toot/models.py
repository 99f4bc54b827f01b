from __future__ import annotations

from typing import Any

from django.db import models
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.translation import gettext_lazy as _


class DeadLetter(models.Model):
    """A delivery or a handler run that failed every attempt of the retry schedule.

    It stays until it is redelivered successfully or an operator deletes it.
    """

    class Kind(models.TextChoices):
        DELIVERY = "delivery", _("delivery to a subscriber")
        HANDLER = "handler", _("local handler")

    kind = models.CharField(max_length=16, choices=Kind.choices)
    event_id = models.CharField(max_length=255, db_index=True)
    channel = models.CharField(max_length=255, db_index=True)
    # Not indexed: 2,048 utf8mb4 characters are 8,192 bytes, over InnoDB's 3,072-byte key
    # limit (MySQL refuses the index, MariaDB cuts it to a prefix). Dead letters are few and
    # only an operator filters them by URL (the admin, toot_redeliver --callback-url), so a
    # scan costs nothing worth a hash column (migration 0002 drops the index).
    callback_url = models.CharField(max_length=2048, blank=True)
    handler = models.CharField(max_length=255, blank=True)
    event = models.JSONField(help_text=_("The event's wire JSON."))
    attempts = models.PositiveIntegerField()
    last_status = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    first_attempt_at = models.DateTimeField()
    last_attempt_at = models.DateTimeField()

    class Meta:
        ordering = ["-last_attempt_at"]
        verbose_name = _("dead letter")

    def __str__(self) -> str:
        target = self.callback_url or self.handler
        return f"{self.event_id} on {self.channel} -> {target}"

    @classmethod
    def bury(
        cls, event: dict[str, Any], attempts: int, first_attempt_at: str | None, **fields: Any
    ) -> DeadLetter:
        """File the event's failed work; ``first_attempt_at`` as an item carries it (ISO)."""
        now = timezone.now()
        letter: DeadLetter = cls.objects.create(
            event_id=event["id"],
            channel=event["channel"],
            event=event,
            attempts=attempts,
            first_attempt_at=(parse_datetime(first_attempt_at) if first_attempt_at else None)
            or now,
            last_attempt_at=now,
            **fields,
        )
        return letter


class OutboxEvent(models.Model):
    """An event published while Redis was unreachable, waiting for the relay."""

    event = models.JSONField(help_text=_("The event's wire JSON."))
    created_at = models.DateTimeField(auto_now_add=True)
    # Set by the relay that is sending the row; another relay may take it over once stale.
    claim = models.CharField(max_length=32, blank=True, db_index=True)
    claimed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        verbose_name = _("outbox event")

    def __str__(self) -> str:
        event: dict[str, Any] = self.event
        return f"{event.get('id')} on {event.get('channel')}"


# The admin's pages of what lives in Redis. They have no table: a model gives each page
# its place in the admin and its permissions, which a project grants as any other.


class Subscription(models.Model):
    """A publisher's subscriptions (kept in Redis): view them, and delete to unsubscribe."""

    class Meta:
        managed = False
        default_permissions = ("view", "delete")
        verbose_name = _("subscription")


class Retry(models.Model):
    """Deliveries waiting for their retry (kept in Redis): change is "retry now"."""

    class Meta:
        managed = False
        default_permissions = ("view", "change")
        verbose_name = _("retry waiting")
        verbose_name_plural = _("retries waiting")


class Overview(models.Model):
    """Queue depths and the last hour's deliveries, failures and handler runs."""

    class Meta:
        managed = False
        default_permissions = ("view",)
        verbose_name = _("overview")
        verbose_name_plural = _("overview")
