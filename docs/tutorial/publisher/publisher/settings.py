# Redis, for Celery's broker and for toot: its work queues, retries and subscriptions.
REDIS_URL = "redis://127.0.0.1:6379/0"

CELERY_BROKER_URL = REDIS_URL
# A queue of this project's own: the subscriber's worker uses the same Redis.
CELERY_TASK_DEFAULT_QUEUE = "publisher"
CELERY_TASK_IGNORE_RESULT = True

TOOT = {
    # Every channel this project publishes on starts with this.
    "CHANNEL_PREFIX": "org.example.publisher.",
    "REDIS_URL": REDIS_URL,
    # Redis keys of this project's own, on the Redis the subscriber uses too.
    "KEY_PREFIX": "toot:publisher:",
    # The subscriber runs on this machine, over plain http: toot delivers only to https
    # URLs on public addresses unless the host is listed here.
    "ALLOWED_CALLBACK_HOSTS": ["127.0.0.1", "localhost"],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "{levelname} {name} {message}", "style": "{"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "toot": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
