from __future__ import annotations

from django.http import HttpRequest, HttpResponse


def noop(request: HttpRequest) -> HttpResponse:
    """The server's plain request rate, for the benchmark's limits: read the body, answer 200."""
    request.body  # noqa: B018 - read, as toot's callback view reads it
    return HttpResponse(status=200)
