from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import include, path

import toot.metrics


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [
    path("", health),
    path("toot/", include("toot.urls")),
    # 404 unless TOOT["METRICS"] is on. Open to whoever reaches the server: in production,
    # serve it where only Prometheus can (docs/metrics.md).
    path("metrics", toot.metrics.view),
]
