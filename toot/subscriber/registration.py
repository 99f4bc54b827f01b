"""Register this app's subscriptions with each source (PROTOCOL.md section 4)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import requests

from toot.conf import conf
from toot.exceptions import ConfigError, RegisterSubscriptionFailure
from toot.http import client
from toot.protocol import auth
from toot.protocol.validation import check_channel
from toot.subscriber.registry import registry

logger = logging.getLogger(__name__)


@dataclass
class Registration:
    """One (source, full channel) to register, and how it went."""

    source: str
    subscription_url: str
    channel: str
    callback_url: str
    status: int | None = None
    error: Exception | None = None

    @property
    def body(self) -> str:
        body: dict[str, object] = {"callback_url": self.callback_url, "channel": self.channel}
        if conf.BATCH:  # a Ruby publisher ignores it (PROTOCOL.md section 7)
            body["batch"] = True
        if conf.RATE_LIMIT is not None:  # ignored by a Ruby publisher too
            body["rate_limit"] = conf.RATE_LIMIT
        return json.dumps(body)

    @property
    def created(self) -> bool:
        return self.status == 201

    @property
    def failure(self) -> str | None:
        """Why it failed, for a line that names the source, channel and URL already.

        A refusal is the source's answer: its error names the source's settings, not ours.
        """
        if isinstance(self.error, RegisterSubscriptionFailure):
            detail = self.error.detail
            return f"the source answered {self.error.status}{': ' + detail if detail else ''}"
        return None if self.error is None else str(self.error)


def planned_registrations() -> list[Registration]:
    """One registration per distinct (source, full channel) among local subscriptions."""
    callback_url = conf.CALLBACK_URL
    if not callback_url:
        raise ConfigError('TOOT["CALLBACK_URL"] must be set to register subscriptions.')
    planned: dict[tuple[str, str], Registration] = {}
    for subscription in registry.subscriptions:
        source = conf.source(subscription.source)
        # Checked again: the source's CHANNEL_PREFIX may have changed since subscribe().
        channel = check_channel(source.channel_prefix + subscription.channel)
        planned.setdefault(
            (source.subscription_url, channel),
            Registration(source.name, source.subscription_url, channel, callback_url),
        )
    return list(planned.values())


def register(registration: Registration) -> Registration:
    """Send one registration; a non-2xx answer raises RegisterSubscriptionFailure.

    A connection failure is raised as requests raised it, as the Ruby gem does. The
    source's ``TOKEN``, if any, goes along as a bearer token.
    """
    token = conf.source(registration.source).token
    # Not through the SSRF guard (toot.http.ssrf): the operator chose this URL in TOOT["SOURCES"],
    # no peer did, and it is often an internal address.
    response = client.post_to_source(
        registration.subscription_url, registration.body, auth.authorization_header(token)
    )
    registration.status = response.status
    if not response.ok:
        raise RegisterSubscriptionFailure(
            registration.subscription_url, registration.channel, response.status, response.excerpt()
        )
    logger.info(
        "Registered %s for %s at %s (status %d)",
        registration.callback_url,
        registration.channel,
        registration.subscription_url,
        response.status,
    )
    return registration


def register_subscriptions(
    *, dry_run: bool = False, report: Callable[[Registration], None] | None = None
) -> list[Registration]:
    """Register every local subscription with its source, once each.

    Every registration is tried; ``report`` sees each as it completes. If any failed,
    the first error is raised after all were tried.
    """
    registrations = planned_registrations()
    first_error: Exception | None = None
    for registration in registrations:
        if not dry_run:
            try:
                register(registration)
            except (RegisterSubscriptionFailure, requests.RequestException) as exc:
                registration.error = exc
                first_error = first_error or exc
                logger.warning(
                    "Registering %s at %s failed: %s",
                    registration.channel,
                    registration.subscription_url,
                    registration.failure,
                )
        if report is not None:
            report(registration)
    if first_error is not None:
        raise first_error
    return registrations
