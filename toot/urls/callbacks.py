"""The subscriber's callbacks endpoint alone: ``include("toot.urls.callbacks")``."""

from __future__ import annotations

from django.urls import path

from toot.views import CallbackView

app_name = "toot"

# No trailing slash: a Ruby peer posts to exactly the configured URL and follows no redirect.
urlpatterns = [path("callbacks", CallbackView.as_view(), name="callbacks")]
