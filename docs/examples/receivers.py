# myproject/receivers.py, imported from the ready() of one of the project's AppConfigs.
import logging

from django.dispatch import receiver

from toot.signals import dead_lettered, delivery_failed, handler_succeeded

logger = logging.getLogger("myproject.toot")


@receiver(delivery_failed)
def subscriber_failing(sender, callback_url, events, attempt, status, error, retry_in, **kwargs):
    """Say so when a subscriber failed three times in a row: it has a problem."""
    if attempt == 3:
        logger.warning(
            "%s failed 3 times (status %s: %s); next try in %s s",
            callback_url,
            status,
            error,
            retry_in,
        )


@receiver(dead_lettered)
def dead_letter_filed(sender, dead_letter, event, kind, **kwargs):
    logger.error(
        "Dead letter %s: event %s on %s (%s)", dead_letter.pk, event.id, event.channel, kind
    )


@receiver(handler_succeeded)
def handler_timing(sender, event, handler, duration, **kwargs):
    if duration > 1.0:
        logger.info("%s took %.1f s for event %s", handler, duration, event.id)
