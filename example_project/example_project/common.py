"""Settings both example projects share, every value from the environment."""

from __future__ import annotations

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

SECRET_KEY = env("DJANGO_SECRET_KEY", default="example-only-not-secret")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])

INSTALLED_APPS = ["django.contrib.contenttypes", "toot"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"
# Each project has its own database (toot keeps dead letters and its outbox there): see
# publisher.py and subscriber.py.
USE_TZ = True

# Each project needs its own queue (or broker) when two share one Redis, as the demo's
# do: a worker only knows its own project's handlers.
REDIS_URL = env("TOOT_REDIS_URL", default="redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_TASK_IGNORE_RESULT = True
# A worker reserves one message at a time: a drain message waiting behind a busy pool
# would hold a lease that a free worker elsewhere could use.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "toot": {
            "handlers": ["console"],
            "level": env("TOOT_LOG_LEVEL", default="INFO"),
            # Not again through the root logger, which a Celery worker gives a handler too.
            "propagate": False,
        }
    },
}
