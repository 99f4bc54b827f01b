"""The accounts app tested with Django's TestCase and toot.testing.TootIsolationMixin."""

from __future__ import annotations

from django.core.cache import cache
from django.test import TestCase, TransactionTestCase

from accounts import services
from toot.testing import TootIsolationMixin


class SignUpTests(TootIsolationMixin, TestCase):
    def test_signing_up_announces_the_user(self):
        with self.captureOnCommitCallbacks(execute=True):
            user = services.sign_up("ada")

        self.toot.assert_published("users.signed_up.v1", contains={"id": user.pk})

    def test_a_bot_is_not_announced(self):
        with self.captureOnCommitCallbacks(execute=True), self.assertRaises(services.BotRefused):
            services.sign_up("bot-3")

        self.toot.assert_nothing_published()


class ViewTests(TootIsolationMixin, TransactionTestCase):
    """Views commit their own transactions: no captureOnCommitCallbacks needed."""

    def test_the_signup_view_publishes_on_commit(self):
        response = self.client.post("/signup", {"username": "grace"})

        self.assertEqual(response.status_code, 201)
        self.toot.assert_published("users.signed_up.v1", keys=["id", "joined"])

    async def test_an_order_is_published_from_an_async_view(self):
        response = await self.async_client.post(
            "/orders", {"sku": "T-2", "total": "5"}, content_type="application/json"
        )

        self.assertEqual(response.status_code, 202)
        self.toot.assert_published("orders.placed.v1", contains={"total": "5"})


class InvoiceHandlerTests(TootIsolationMixin, TestCase):
    def setUp(self):
        super().setUp()
        cache.clear()

    def test_a_paid_invoice_is_counted(self):
        delivery = self.toot.deliver("billing", "invoices.paid.v1", {"user": 5, "invoice": 1})

        self.assertEqual(delivery.ran, ["accounts.handlers.invoice_paid"])
        self.assertEqual(cache.get("paid-invoices:5"), 1)

    def test_the_endpoint_runs_the_handlers_of_a_signed_post(self):
        event = self.toot.event("billing", "invoices.refunded.v1", {"invoice": 2, "amount": "1"})

        response = self.toot.post(self.client, event)

        self.assertEqual(response.status_code, 200)
        self.assertEqual(cache.get("refund:2"), "1")
