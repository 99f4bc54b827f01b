"""The publisher's subscriptions endpoint alone: ``include("toot.urls.subscriptions")``."""

from __future__ import annotations

from django.urls import path

from toot.views import SubscriptionsView

app_name = "toot"

# No trailing slash: a Ruby peer posts to exactly the configured URL and follows no redirect.
urlpatterns = [path("subscriptions", SubscriptionsView.as_view(), name="subscriptions")]
