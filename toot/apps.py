from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class TootConfig(AppConfig):
    name = "toot"
    verbose_name = "Toot"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the checks and put the parts together; touches no Redis, database or
        network: the relay starts with a worker, on Celery's ``worker_ready``, as does the check
        of toot's Redis (``toot.engine.redis_config``)."""
        from celery.signals import worker_ready, worker_shutting_down
        from django.core.signals import setting_changed

        from toot import metrics
        from toot.checks import (
            check_celery,
            check_redis,
            check_security,
            check_settings,
            check_subscriptions,
        )
        from toot.engine import drain, queue, redis_config, relay
        from toot.publisher import outbox, sending
        from toot.subscriber import handling

        checks.register(check_settings)
        checks.register(check_subscriptions)
        checks.register(check_celery)
        checks.register(check_security, checks.Tags.security)
        # Only under check --deploy: it talks to Redis.
        checks.register(check_redis, "redis", deploy=True)

        drain.PROCESSORS[queue.OUT] = sending.process
        drain.HOSTS[queue.OUT] = sending.hosting
        drain.PROCESSORS[queue.IN] = handling.process
        drain.HOSTS[queue.IN] = handling.hosting
        drain.ROUTERS[queue.IN] = handling.celery_queue
        for step in (sending.relay_step, outbox.relay_step):
            if step not in relay.STEPS:
                relay.STEPS.append(step)
        worker_ready.connect(relay.on_worker_ready, dispatch_uid="toot.relay.start")
        worker_shutting_down.connect(relay.on_worker_shutting_down, dispatch_uid="toot.relay.stop")
        worker_ready.connect(redis_config.on_worker_ready, dispatch_uid="toot.redis_config.check")
        # Only when TOOT["METRICS"] is on: imports prometheus_client, connects receivers.
        metrics.setup()
        setting_changed.connect(metrics.setup, dispatch_uid="toot.metrics.setup")
