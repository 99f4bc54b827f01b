"""Values made once per process, such as connection pools and threads.

A Celery prefork worker forks its children after the project is imported, and a child
must not share its parent's sockets, nor count on threads that fork() did not copy: it
makes its own value on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerProcess(Generic[T]):
    """Calling it returns this process's value, made by ``make`` the first time."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._made: tuple[T] | None = None
        self._lock = threading.Lock()
        # A forked child forgets the value, and gets a new lock: a thread of the parent may
        # hold the old one as it forks. Forgetting at fork spares every call a getpid().
        if hasattr(os, "register_at_fork"):  # pragma: no branch - Windows has no fork()
            os.register_at_fork(after_in_child=self._after_fork)

    def __call__(self) -> T:
        made = self._made
        if made is None:
            with self._lock:  # made once even when threads ask at the same time
                made = self._made = self._made or (self._make(),)
        return made[0]

    def _after_fork(self) -> None:  # pragma: no cover - runs in the forked child
        self._made = None
        self._lock = threading.Lock()
