from __future__ import annotations

import json
from decimal import Decimal

from django.http import HttpRequest, JsonResponse

import toot
from accounts import services


def signup(request: HttpRequest) -> JsonResponse:
    try:
        user = services.sign_up(request.POST["username"], newsletter="newsletter" in request.POST)
    except services.BotRefused:
        return JsonResponse({"error": "no bots"}, status=400)
    return JsonResponse({"id": user.pk}, status=201)


async def place_order(request: HttpRequest) -> JsonResponse:
    order = json.loads(request.body)
    event = await toot.apublish(
        "orders.placed.v1", {"sku": order["sku"], "total": Decimal(order["total"])}
    )
    return JsonResponse({"event": event.id}, status=202)
