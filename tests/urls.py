from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import include, path

import toot
import toot.metrics


async def publish_from_async_view(request: HttpRequest) -> JsonResponse:
    """A project's async view that publishes, as under an ASGI server."""
    event = toot.publish("orders.created.v1", {"from": "async"})
    return JsonResponse({"id": event.id})


urlpatterns = [
    path("toot/", include("toot.urls")),
    path("async-publish/", publish_from_async_view),
    path("metrics", toot.metrics.view),
]
