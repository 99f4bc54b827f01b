# Redis, for Celery's broker and for toot: its work queue, retries and handler dedupe.
REDIS_URL = "redis://127.0.0.1:6379/0"

CELERY_BROKER_URL = REDIS_URL
# A queue of this project's own: the publisher's worker uses the same Redis.
CELERY_TASK_DEFAULT_QUEUE = "subscriber"
CELERY_TASK_IGNORE_RESULT = True

TOOT = {
    # Where publishers deliver this project's events: its /toot/callbacks endpoint.
    "CALLBACK_URL": "http://127.0.0.1:8002/toot/callbacks",
    # The publishers this project subscribes to, each by a name of its choice.
    "SOURCES": {
        "publisher": {
            "SUBSCRIPTION_URL": "http://127.0.0.1:8001/toot/subscriptions",
            "CHANNEL_PREFIX": "org.example.publisher.",
        },
    },
    "REDIS_URL": REDIS_URL,
    # Redis keys of this project's own, on the Redis the publisher uses too.
    "KEY_PREFIX": "toot:subscriber:",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "{levelname} {name} {message}", "style": "{"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "toot": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "accounts": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
