"""The example subscriber's tests, with toot.testing alone: no Redis, broker or network.

Run them from example_project/ (.ci/run does, with Redis at a closed port):

    DJANGO_SETTINGS_MODULE=example_project.subscriber python manage.py test example_app
"""

from __future__ import annotations

from django.conf import settings
from django.test import TestCase, override_settings

from toot.testing import DeliveryRefused, TootIsolationMixin

SECRET = "whsec_ZXhhbXBsZS1wcm9qZWN0LXRlc3RzLXNlY3JldC0wMQ=="


@override_settings(EXAMPLE_RECEIPTS_KEY="")  # the demo's receipts live in Redis: none here
class HandlerTests(TootIsolationMixin, TestCase):
    def test_an_updated_user_is_handled_once_however_often_it_comes(self) -> None:
        event = self.toot.event("publisher", "users.updated.v1", {"id": 1})

        with self.assertLogs("example_app.handlers", "INFO") as logs:
            first = self.toot.deliver_event(event)
            again = self.toot.deliver_event(event)  # the publisher retried

        self.assertEqual(first.ran, ["example_app.handlers.user_updated"])
        self.assertEqual(again.ran, [])
        self.assertEqual(again.skipped, ["example_app.handlers.user_updated"])
        self.assertEqual(len(logs.output), 1)
        self.assertIn(f"event {event.id} on {event.channel}: handled", logs.output[0])

    def test_a_deleted_user_is_handled_through_the_callbacks_endpoint(self) -> None:
        event = self.toot.event("publisher", "users.deleted.v1", {"id": 2})

        with self.assertLogs("example_app.handlers", "INFO"):
            response = self.toot.post(self.client, event)

        self.assertEqual(response.status_code, 200)
        self.assertEqual(self.toot.handled, [(event, "example_app.handlers.user_deleted")])

    def test_a_channel_with_no_handler_here_is_refused(self) -> None:
        with self.assertRaisesMessage(DeliveryRefused, "no handler here"):
            self.toot.deliver("publisher", "users.created.v1", {"id": 3})


SIGNED = {
    **settings.TOOT,
    "SOURCES": {
        "publisher": {**settings.TOOT["SOURCES"]["publisher"], "SECRETS": [SECRET]},
    },
}


@override_settings(EXAMPLE_RECEIPTS_KEY="", TOOT=SIGNED)
class SignedDeliveryTests(TootIsolationMixin, TestCase):
    def test_a_signed_delivery_is_handled(self) -> None:
        with self.assertLogs("example_app.handlers", "INFO"):
            delivery = self.toot.deliver("publisher", "users.updated.v1", {"id": 4})

        self.assertEqual(delivery.ran, ["example_app.handlers.user_updated"])

    def test_an_unsigned_delivery_is_refused(self) -> None:
        event = self.toot.event("publisher", "users.updated.v1", {"id": 5})

        response = self.client.post(
            "/toot/callbacks", event.to_json(), content_type="application/json"
        )

        self.assertEqual(response.status_code, 401)
        self.assertEqual(self.toot.handled, [])
