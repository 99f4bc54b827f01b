"""toot's pytest plugin, loaded through the ``pytest11`` entry point when toot is installed.

Its fixtures wrap ``toot.testing``; it imports nothing of Django or toot until a test
asks for one, so that it costs nothing to a test run that has no Django settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from toot.protocol.events import Event
    from toot.testing import Isolation


@pytest.fixture
def toot_isolated() -> Iterator[Isolation]:
    """toot kept off Redis, the broker and the network for the test (``toot.testing.isolated``):
    what it publishes is captured, events delivered to it are handled in the test's thread."""
    from toot.testing import isolated

    with isolated() as isolation:
        yield isolation


@pytest.fixture
def toot_published(toot_isolated: Isolation) -> list[Event]:
    """The events the test published and committed, as subscribers get them (the list of
    ``toot_isolated.published``, filled as the test runs)."""
    return toot_isolated.published
