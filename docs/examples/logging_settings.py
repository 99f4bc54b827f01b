# settings.py: toot's lines, under runserver or gunicorn and in a Celery worker alike.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "{asctime} {levelname} {name} {message}", "style": "{"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
    },
    "loggers": {
        # A handler of toot's own rather than the root logger's: a Celery worker replaces
        # the root logger's handlers with its own, at its --loglevel (WARNING by default).
        "toot": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
