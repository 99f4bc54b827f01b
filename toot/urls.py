from __future__ import annotations

from django.urls import path

from toot.views import CallbackView, SubscriptionsView

app_name = "toot"

# No trailing slash: a Ruby peer posts to exactly the configured URL and follows no redirect.
urlpatterns = [
    path("subscriptions", SubscriptionsView.as_view(), name="subscriptions"),
    path("callbacks", CallbackView.as_view(), name="callbacks"),
]
