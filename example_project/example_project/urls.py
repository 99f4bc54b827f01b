from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import include, path


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


def bench_noop(request: HttpRequest) -> HttpResponse:
    """The server's plain request rate, for the benchmark: read the body, answer 200."""
    request.body  # noqa: B018 - read, as toot's callback view reads it
    return HttpResponse(status=200)


urlpatterns = [
    path("", health),
    path("bench/noop", bench_noop),
    path("toot/", include("toot.urls")),
]
