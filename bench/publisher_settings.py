"""The example publisher's settings, with the benchmark's READ_TIMEOUT (``--read-timeout``).

Used only when ``--read-timeout`` is given: a silent callback URL (``--slow 1xsilent``)
then costs each attempt that long, not toot's default 15 s.
"""

from __future__ import annotations

from example_project.common import env
from example_project.publisher import *  # noqa: F403
from example_project.publisher import TOOT

TOOT = {**TOOT, "READ_TIMEOUT": env.float("BENCH_READ_TIMEOUT")}
