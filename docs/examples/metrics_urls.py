"""The project's ``urls.py``: toot's metrics at /metrics, beside toot's own URLs."""

from django.urls import include, path

import toot.metrics

urlpatterns = [
    path("toot/", include("toot.urls")),
    # No credentials asked: serve it where only Prometheus reaches it (see below).
    path("metrics", toot.metrics.view),
]
