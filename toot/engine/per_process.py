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
        self._made: tuple[int, T] | None = None
        self._lock = threading.Lock()
        # A thread of the parent may hold the lock as it forks: the child gets a new one.
        if hasattr(os, "register_at_fork"):  # pragma: no branch - Windows has no fork()
            os.register_at_fork(after_in_child=self._after_fork)

    def __call__(self) -> T:
        # The value is checked against the pid, not only forgotten at fork: uWSGI forks its
        # workers without running Python's at-fork hooks.
        pid = os.getpid()
        made = self._made
        if made is None or made[0] != pid:  # the lock only to make it, not on every call
            with self._lock:  # made once even when threads ask at the same time
                made = self._made
                made = self._made = made if made and made[0] == pid else (pid, self._make())
        return made[1]

    def _after_fork(self) -> None:  # pragma: no cover - runs in the forked child
        self._lock = threading.Lock()
