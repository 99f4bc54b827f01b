"""The two endpoints of the protocol: subscriptions (publisher) and callbacks (subscriber).

Every refusal is a 4xx with a JSON body ``{"error": ...}`` naming what was wrong; a
failing store or broker is a 503, so that the peer retries and nothing is lost.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt

from toot import signals
from toot.conf import Source, conf
from toot.engine import drain, queue
from toot.engine.broker import BROKER_ERRORS
from toot.exceptions import InvalidCallback, InvalidEvent, InvalidSignature, Refused
from toot.http import ssrf
from toot.models import Subscription
from toot.protocol import auth, signing
from toot.protocol.events import BATCH_MAX_BYTES, BATCH_WRAPPER_BYTES, Event, wire_json
from toot.protocol.validation import (
    MAX_JSON_DEPTH,
    channel_error,
    nests_deeper,
    unstorable_text,
    url_error,
)
from toot.publisher import store
from toot.subscriber import handling
from toot.subscriber.registry import registry

if TYPE_CHECKING:
    from toot.tracing import Receipt

logger = logging.getLogger(__name__)

# A registration is two short strings; nothing legitimate comes near this.
MAX_SUBSCRIPTION_BYTES = 16 * 1024
# The most events per second a registration's rate_limit may ask for: more is a typo.
MAX_RATE_LIMIT = 100_000


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JsonResponse:
    return JsonResponse({"error": message}, status=status, headers=headers)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Python reads inf, which no JSON peer can read back
        raise ValueError(f"{text} is out of range")
    return value


def read_json(request: HttpRequest, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The request body as JSON, refusing oversized, malformed and too deeply nested bodies."""
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise Refused(400, "Content-Length is not a number") from None
    if declared > max_bytes:
        raise Refused(413, f"body is larger than {max_bytes} bytes")
    try:
        body = request.body
    except RequestDataTooBig:  # DATA_UPLOAD_MAX_MEMORY_SIZE is lower than ours
        raise Refused(413, "body is larger than the server accepts") from None
    if len(body) > max_bytes:
        raise Refused(413, f"body is larger than {max_bytes} bytes")
    try:
        # Strict UTF-8: json.loads(bytes) would let a lone surrogate through, which no
        # UTF-8 encoder takes back (a handler's own Redis or database writes included).
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Refused(400, "body is not valid JSON") from None
    refuse_too_deep(body, data, max_depth)
    unstorable = unstorable_text(data, text)
    if unstorable:
        raise Refused(400, f"body holds {unstorable}")
    return data


def refuse_too_deep(body: bytes, data: Any, max_depth: int) -> None:
    if nests_deeper(data, max_depth, text=body):
        raise Refused(400, f"body is nested too deeply (over {max_depth} levels)")


@method_decorator(csrf_exempt, name="dispatch")
class TootView(View):
    """Turns Refused, store and broker failures into JSON answers."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        try:
            self.authenticate(request)
            return super().dispatch(request, *args, **kwargs)
        except Refused as refused:
            return error_response(refused.status, refused.message, refused.headers)
        except BROKER_ERRORS as exc:
            logger.error(
                "%s %s: store or broker unavailable: %s", request.method, request.path, exc
            )
            return error_response(503, "toot is unavailable, try again later")

    def authenticate(self, request: HttpRequest) -> None:
        """Raise Refused unless the request may be served; callbacks check signatures later."""

    def http_method_not_allowed(
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        response = error_response(405, f"method {request.method} is not allowed")
        response["Allow"] = ", ".join(m.upper() for m in self.http_method_names)
        return response


class SubscriptionsView(TootView):
    """Publisher side: subscribers add, list and remove callback URLs per channel."""

    http_method_names = ["get", "post", "delete"]

    def authenticate(self, request: HttpRequest) -> None:
        # Before anything else, the method included: a stranger learns nothing here.
        error = auth.authentication_error(request)
        if error:
            logger.warning("%s %s refused: %s", request.method, request.path, error)
            raise Refused(401, error, {"WWW-Authenticate": "Bearer"})

    def get(self, request: HttpRequest) -> HttpResponse:
        if "application/json" not in request.headers.get("Accept", ""):
            raise Refused(406, "only application/json is served; send Accept: application/json")
        subscriptions = store.subscriptions(conf.CHANNEL_PREFIX)
        return JsonResponse({"channels": list(subscriptions), "subscriptions": subscriptions})

    def post(self, request: HttpRequest) -> HttpResponse:
        data = read_json(request, MAX_SUBSCRIPTION_BYTES)
        if not isinstance(data, dict):
            raise Refused(422, "body must be a JSON object with channel and callback_url")
        channel, callback_url = self._fields(data.get("channel"), data.get("callback_url"), 422)
        batch = data.get("batch", False)
        if not isinstance(batch, bool):
            raise Refused(422, "batch must be true or false")
        rate = data.get("rate_limit")
        if rate is not None and not (
            isinstance(rate, (int, float))
            and not isinstance(rate, bool)
            and 0 < rate <= MAX_RATE_LIMIT
        ):
            raise Refused(
                422,
                "rate_limit must be a number of events per second, over 0 and at most "
                f"{MAX_RATE_LIMIT}",
            )
        self._check_callback(channel, callback_url)
        added = store.add(channel, callback_url, batch=batch, rate=rate)
        logger.info(
            "Subscription %s to %s %s%s%s",
            callback_url,
            channel,
            "added" if added else "already there",
            ", in batches" if batch else "",
            f", at most {rate:g} events/s" if rate else "",
        )
        signals.send(
            signals.subscription_added,
            Subscription,
            f"Subscription {callback_url} to {channel}",
            channel=channel,
            callback_url=callback_url,
            created=added,
            batch=batch,
            rate_limit=rate,
        )
        return HttpResponse(status=201 if added else 204)

    def delete(self, request: HttpRequest) -> HttpResponse:
        try:
            query = request.GET
        except TooManyFieldsSent:  # over DATA_UPLOAD_MAX_NUMBER_FIELDS: Django's 400 is HTML
            raise Refused(400, "too many query parameters") from None
        channel, callback_url = self._fields(query.get("channel"), query.get("callback_url"), 400)
        if not store.remove(channel, callback_url):
            raise Refused(404, f"{callback_url} is not subscribed to {channel}")
        logger.info("Subscription %s to %s removed", callback_url, channel)
        signals.send(
            signals.subscription_removed,
            Subscription,
            f"Subscription {callback_url} to {channel}",
            channel=channel,
            callback_url=callback_url,
            reason="request",
        )
        return HttpResponse(status=204)

    @staticmethod
    def _fields(channel: object, callback_url: object, missing_status: int) -> tuple[str, str]:
        missing = [
            name
            for name, value in (("channel", channel), ("callback_url", callback_url))
            if value in (None, "")
        ]
        if missing:
            raise Refused(missing_status, f"{' and '.join(missing)} required")
        error = channel_error(channel) or url_error(callback_url)
        if error:
            raise Refused(422, error)
        return channel, callback_url  # type: ignore[return-value]

    @staticmethod
    def _check_callback(channel: str, callback_url: str) -> None:
        """Refuse now a URL that no delivery would be sent to (the SSRF guard, toot.http.ssrf).

        Only on POST: DELETE must still remove a URL stored before the rules changed.
        """
        try:
            ssrf.check_callback_url(callback_url)
        except InvalidCallback as exc:
            logger.warning("Subscription %s to %s refused: %s", callback_url, channel, exc)
            raise Refused(422, str(exc)) from None
        except OSError:  # a temporary resolver failure: the subscriber should try again
            raise Refused(503, "cannot resolve the callback_url host now; try again") from None


class CallbackView(TootView):
    """Subscriber side: accept an event, or a batch, and queue its handlers."""

    http_method_names = ["post"]

    def post(self, request: HttpRequest) -> HttpResponse:
        if not conf.TRACING:
            return self.accept(request)
        from toot import tracing

        # A refusal (a 4xx) leaves the span before it is raised: it is the sender's error,
        # not the receipt's, which any other exception is.
        refusal: Refused | None = None
        with tracing.receiving(request) as receipt:
            try:
                response = self.accept(request, receipt)
            except Refused as refused:
                receipt.answered(refused.status)
                refusal = refused
            else:
                receipt.answered(response.status_code)
        if refusal is not None:
            raise refusal
        return response

    def accept(self, request: HttpRequest, receipt: Receipt | None = None) -> HttpResponse:
        """Read, verify and queue the request's events; ``receipt``: its span when tracing,
        whose context each queued item carries to its handler's span."""
        events = self.events(request)
        if receipt is not None:
            receipt.events(events)
        channel = events[0].channel
        matched = registry.matching(channel)
        self.verify_signature(
            request, {conf.source_for_channel(channel), *(source for source, _ in matched)}, events
        )
        what = ("Events " if len(events) > 1 else "Event ") + ", ".join(e.id for e in events)
        what += f" on {channel}"
        if not matched:
            logger.info("%s: no local subscription, asking to unsubscribe", what)
            self.received(events, channel, [], what)
            response = HttpResponse(status=200)
            response["X-Toot-Unsubscribe"] = "True"
            return response
        # One round trip: each handler's lane gets every event, all or none, so that a slow
        # handler holds back only its own. A lane that failed is pushed again by the
        # publisher's retry, and the done marks keep the lanes that did not from running
        # twice. MAX_JSON_DEPTH keeps every event serializable.
        wire = [event.to_dict() for event in events]
        names = list(handling.handlers_by_name(channel))
        traceparent = None if receipt is None else receipt.traceparent
        try:
            drain.enqueue_many(
                {
                    handling.lane(name): [
                        queue.encode(handling.in_item(e, name, traceparent)) for e in wire
                    ]
                    for name in names
                }
            )
        except BROKER_ERRORS as exc:
            logger.error("%s: cannot queue the handlers, store unavailable: %s", what, exc)
            return error_response(503, "toot is unavailable, try again later")
        logger.info("%s: received, queued for %s", what, ", ".join(names))
        self.received(events, channel, names, what)
        return HttpResponse(status=200)

    @staticmethod
    def received(events: list[Event], channel: str, handlers: list[str], what: str) -> None:
        signals.send(
            signals.event_received,
            Event,
            what,
            events=events,
            channel=channel,
            handlers=handlers,
        )

    @staticmethod
    def events(request: HttpRequest) -> list[Event]:
        """The body's event, or its batch's events (docs/protocol.md section 7), of one channel."""
        # A batch of several events stays under BATCH_MAX_BYTES; one larger event goes
        # alone, in its wrapper. {"events": [...]} nests its events two levels deeper:
        # each is held to the limit.
        size = max(conf.MAX_EVENT_BYTES + BATCH_WRAPPER_BYTES, BATCH_MAX_BYTES)
        data = read_json(request, size, MAX_JSON_DEPTH + 2)
        if not (isinstance(data, dict) and "events" in data):
            if len(request.body) > conf.MAX_EVENT_BYTES:
                raise Refused(413, f"event is larger than {conf.MAX_EVENT_BYTES} bytes")
            refuse_too_deep(request.body, data, MAX_JSON_DEPTH)
            try:
                return [Event.from_dict(data)]
            except InvalidEvent as exc:
                raise Refused(422, str(exc)) from None
        batch = data["events"]
        if not isinstance(batch, list) or not 0 < len(batch) <= conf.BATCH_MAX_EVENTS:
            raise Refused(422, f"events must be a list of 1 to {conf.BATCH_MAX_EVENTS} events")
        events = []
        for index, item in enumerate(batch):
            try:
                events.append(Event.from_dict(item))
            except InvalidEvent as exc:
                raise Refused(422, f"events[{index}]: {exc}") from None
            if events[index].channel != events[0].channel:
                raise Refused(
                    422, f"events[{index}]: every event of a batch must be of one channel"
                )
            if len(wire_json(item)) > conf.MAX_EVENT_BYTES:  # as a publisher measures it
                raise Refused(
                    413, f"events[{index}]: event is larger than {conf.MAX_EVENT_BYTES} bytes"
                )
        return events

    @staticmethod
    def verify_signature(
        request: HttpRequest, sources: set[Source | None], events: list[Event]
    ) -> None:
        """Refuse with 401 unless each of ``sources`` that has secrets signed the request.

        The sources are the one whose prefix starts the channel, so that a stranger learns
        nothing (not even which channels are handled here), and those of the matching
        subscriptions: when one source's prefix extends another's, a handler subscribed
        through the signed one must not run for an event that only the other's claims.
        """
        for source in sorted(filter(None, sources)):
            if not source.secrets:
                continue  # unsigned, as a Ruby publisher sends
            try:
                signing.verify(
                    request.body,  # the bytes as received: re-encoded JSON would not match
                    request.headers,
                    source.secrets,
                    name=f'a secret of TOOT["SOURCES"]["{source.name}"]',
                )
            except InvalidSignature as exc:
                # The ids as repr(): they are a stranger's until the signature holds.
                logger.warning(
                    "Events %s on %s: refused, not signed by source %s: %s",
                    ", ".join(repr(event.id) for event in events),
                    events[0].channel,
                    source.name,
                    exc,
                )
                raise Refused(401, str(exc)) from None
