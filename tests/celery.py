"""The project's Celery app, as a user would have one; toot itself defines none."""

from __future__ import annotations

from celery import Celery

app = Celery("tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
