from __future__ import annotations

from django.contrib.auth.models import User
from django.db import transaction

import toot


class BotRefused(Exception):
    pass


def sign_up(username: str, *, newsletter: bool = False) -> User:
    """Create the user and announce it; a bot's signup rolls back, and announces nothing."""
    with transaction.atomic():
        user: User = User.objects.create_user(username)
        toot.publish(
            "users.signed_up.v1",
            {
                "id": user.pk,
                "username": username,
                "joined": user.date_joined,
                "newsletter": newsletter,
            },
        )
        if username.startswith("bot-"):
            raise BotRefused(username)
    return user
