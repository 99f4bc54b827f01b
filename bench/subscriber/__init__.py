"""What the benchmark adds to the example subscriber: M copies of one callback URL.

The benchmark subscribes M callback URLs to one channel, all served by the one example
subscriber: ``.../toot/callbacks`` (copy 0) and ``.../toot/callbacks?copy=1`` up to
``copy=M-1``. Its subscriber processes run ``bench.subscriber.settings``, the example's
settings with this app installed (``BENCH_COPIES``: the most copies a burst subscribes);
the example project itself stays as a user would write it. See copies.py for how each
copy runs a handler of its own, and views.py for the plain view the limits POST to.
"""

from __future__ import annotations

# The channel the copies subscribe to, without the publisher's prefix.
CHANNEL = "bench.v1"
