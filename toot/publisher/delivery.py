"""One delivery attempt to a callback URL."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from toot import signals
from toot.conf import conf
from toot.exceptions import ConfigError, InvalidCallback
from toot.http import client
from toot.protocol import signing
from toot.publisher import store

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: int | None = None
    error: str = ""
    retry_after: float | None = None
    # Refused by the SSRF guard: no request was sent, and none is retried. A retry would
    # only hide the refusal for a day; the dead letter shows it at once, and can be
    # replayed once the URL or the allow-lists are fixed.
    refused: bool = False
    # The publisher's own settings failed (a malformed secret, a missing CA bundle): not
    # the URL's fault, so its circuit breaker does not count it.
    ours: bool = False
    # Seconds the request took, for the signals; None when none was sent.
    duration: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410

    @property
    def of_the_url(self) -> bool:
        """A failure the URL's other deliveries would meet too: no answer, a refusal, 410,
        429 or 5xx; not one of this body alone (400, 413, 422...)."""
        if self.ok:
            return False
        return self.status is None or self.status >= 500 or self.status in (410, 429)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²", a latin-1 header byte, is isdigit() too
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


def attempt(
    callback_url: str,
    channel: str,
    body: bytes,
    message_id: str,
    *,
    what: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Outcome:
    """POST ``body`` (one event or a batch) once; honours X-Toot-Unsubscribe and 410 Gone.

    ``message_id`` is the webhook-id that names the event, or the batch, in signatures;
    ``channel`` is the one an unsubscribe removes the URL from; ``what`` names the
    delivery's events in log lines (``Event <id> on <channel>``, or the batch's);
    ``headers`` go with the signature's (a traceparent, toot.tracing).
    """
    what = what or f"Event {message_id} on {channel}"
    try:
        # Signed at each attempt: webhook-timestamp must be fresh when the subscriber reads it.
        signed = signing.signature_headers(message_id, body, conf.SIGNING_SECRETS)
    except ConfigError as exc:  # a bad secret: retried like a failure, so a fix loses nothing
        logger.error("%s: cannot sign the delivery to %s: %s", what, callback_url, exc)
        return Outcome(error=f"{type(exc).__name__}: {exc}", ours=True)
    started = time.perf_counter()
    try:
        # The SSRF rules again: the URL's at each attempt, its host's addresses at each new
        # connection (a kept-alive one goes to an address checked when it opened).
        response = client.post_to_callback(
            callback_url, body, {**signed, **headers} if headers else signed
        )
    except InvalidCallback as exc:
        logger.error("%s: refused to send it to %s: %s", what, callback_url, exc)
        return Outcome(error=f"{type(exc).__name__}: {exc}", refused=True)
    except ConfigError as exc:  # PROXY_URL, CA_BUNDLE or CLIENT_CERT: as a bad secret above
        logger.error("%s: cannot send it to %s: %s", what, callback_url, exc)
        return Outcome(error=f"{type(exc).__name__}: {exc}", ours=True)
    except client.ERRORS as exc:  # no answer, none in time, or a host that does not resolve
        return Outcome(
            error=client.error_text(exc, callback_url), duration=time.perf_counter() - started
        )
    outcome = Outcome(status=response.status, duration=time.perf_counter() - started)
    if not outcome.ok:
        outcome.error = response.excerpt()
        if response.status in (429, 503):
            outcome.retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if outcome.gone or (outcome.ok and "X-Toot-Unsubscribe" in response.headers):
        removed = store.remove(channel, callback_url)
        logger.info(
            "%s: %s asked to unsubscribe from %s (status %d); %s",
            what,
            callback_url,
            channel,
            response.status,
            "removed" if removed else "it was not subscribed",
        )
        if removed:
            from toot.models import Subscription

            signals.send(
                signals.subscription_removed,
                Subscription,
                f"Subscription {callback_url} to {channel}",
                channel=channel,
                callback_url=callback_url,
                reason="gone" if outcome.gone else "unsubscribe",
            )
    return outcome
