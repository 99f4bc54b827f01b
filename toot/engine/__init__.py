"""The queue engine: work queues in Redis, the leases of the drains that work through
them, the ``toot.drain`` task, the relay in each worker, and the broker it starts
drains through.

It knows nothing of publishing or subscribing: each side gives it a processor for its
queue (``drain.PROCESSORS``), and the publisher a relay step for its outbox, when the app
is ready (``toot.apps``).
"""
