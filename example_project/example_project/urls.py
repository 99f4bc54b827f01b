from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import include, path


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [
    path("", health),
    path("toot/", include("toot.urls")),
]
