import logging

import toot

logger = logging.getLogger(__name__)


def user_updated(event: toot.Event) -> None:
    logger.info("User %s was updated at %s", event["id"], event.timestamp)
