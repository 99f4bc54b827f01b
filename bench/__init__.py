"""toot's end-to-end benchmark: ``python -m bench`` (or ``python3 dev.py bench``).

From a fresh clone it starts the real topology of the example project: Redis (an
embedded redis-server, unless ``$TOOT_REDIS_URL`` is set), a publisher and a subscriber
each served by gunicorn with a Celery worker (prefork), subscribes M callback URLs to
one channel, and then measures, in one run:

* burst: N events published as fast as ``toot.publish`` goes; deliveries per second from
  the first publish until all N x M handler runs are recorded, and what ``publish()``
  costs its caller;
* paced: events at a fixed rate (20/s and 200/s); the latency from ``publish()`` to the
  handler, p50/p95/p99;
* the machine's limits: a Celery no-op task's consumption rate on the same broker, and
  the subscriber's gunicorn plain POST rate from one Python client;
* CPU milliseconds per delivery of each process tree, peak RSS, and losses and
  duplicates, counted by (event id, copy of the URL): both must be zero;
* Redis's calls by command and its own CPU, per event and per delivery, in each burst
  (bench/redis_commands.py).

``--workers N`` runs N Celery workers per side. ``python -m bench.capacity`` turns a run's
figures into the capacity model of docs/capacity.md (bench/capacity.py).

With ``--slow``, the bursts and paced runs are measured with slow callback URLs on the
channel too, beside the measured subscriber (issue 15; see bench/slow.py).

It prints a table, writes bench-results/<time>.json, draws bench-results/<time>.png
when matplotlib is installed, and ends with one line per delivery mode and M:
``mode=<single|batch> M=<m> deliveries_per_s=<x>``. See bench/subscriber/ for how M
callback URLs of one subscriber make M handler runs per event.
"""
