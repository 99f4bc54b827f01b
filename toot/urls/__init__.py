"""Both endpoints: ``path("toot/", include("toot.urls"))``.

A project that only publishes or only subscribes can mount one alone,
``include("toot.urls.subscriptions")`` or ``include("toot.urls.callbacks")``: a
subscriber that serves no subscriptions endpoint needs no ``SUBSCRIPTIONS_AUTH``
(toot.W003 looks for the route).
"""

from __future__ import annotations

from toot.urls import callbacks, subscriptions

app_name = "toot"

urlpatterns = [*subscriptions.urlpatterns, *callbacks.urlpatterns]
