# Every process that loads the settings loads the Celery app too: toot sends its
# toot.drain tasks through it, to CELERY_BROKER_URL.
from .celery import app as celery_app

__all__ = ("celery_app",)
