"""A slow handler beside the example subscriber's fast ones, for tests/test_slow_handlers.py.

Installed by its settings module, ``tests.slow_handler.settings``, which the test's
subscriber processes run: the example project itself stays as a user would write it.
"""

from __future__ import annotations

# The slow handler's channel, without the publisher's prefix.
CHANNEL = "reports.requested.v1"
