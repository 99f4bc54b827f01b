"""Values made once per process: toot's pools, threads and ids, and a forked child's own."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading

import pytest

from toot.engine import queue
from toot.engine.per_process import PerProcess
from toot.http import client, transport
from toot.publisher import sending

# Each test's child only calls what it tests; the fork warning of Python 3.12+ is about
# other work.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def in_a_child(answer, fork=os.fork):
    """What ``answer()`` returns (bytes) in a forked child of this process."""
    read, write = os.pipe()
    pid = fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, answer())
        finally:
            os._exit(0)
    os.close(write)
    try:
        answered, _, _ = select.select([read], [], [], 30)
        if not answered:
            os.kill(pid, signal.SIGKILL)
        return os.read(read, 64) if answered else b"no answer"
    finally:
        os.close(read)
        os.waitpid(pid, 0)


@pytest.mark.parametrize(
    "made",
    [client.get_session, client._pools, sending.pool, transport._watchdog, queue._id_prefix],
    ids=["session", "pools", "senders", "watchdog", "ids"],
)
def test_toots_pools_threads_and_ids_are_one_per_process(made):
    first = made()
    assert made() is first

    assert in_a_child(lambda: b"new" if made() is not first else b"same") == b"new"
    assert made() is first


def test_a_child_forked_without_pythons_fork_hooks_makes_its_own():
    # As uWSGI forks its workers by default: C's fork(), and none of os.fork()'s hooks.
    fork = ctypes.CDLL(None, use_errno=True).fork
    first = queue.new_id()

    child_id = in_a_child(lambda: queue.new_id().encode(), fork).decode()

    assert child_id[:16] != first[:16]  # a prefix of its own: no lease id of the parent's


def test_threads_asking_at_once_get_one_value():
    made: list[object] = []
    barrier = threading.Barrier(8)

    def make():
        made.append(object())
        return made[-1]

    value = PerProcess(make)
    got: list[object] = []

    def ask():
        barrier.wait()
        got.append(value())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1
    assert got == made * 8


def test_a_child_forked_while_the_value_is_being_made_makes_its_own():
    value = PerProcess(lambda: "made")
    with value._lock:  # another thread is making it as the process forks
        answer = in_a_child(lambda: value().encode())
    assert answer == b"made"


def test_ids_are_unique_in_a_process_and_across_processes():
    ids = {queue.new_id() for _ in range(10_000)}
    assert len(ids) == 10_000

    child_ids = in_a_child(lambda: " ".join(queue.new_id() for _ in range(2)).encode()).split()
    assert len(child_ids) == 2
    assert not ids & {id.decode() for id in child_ids}
    assert queue.new_id()[:16] not in {id[:16].decode() for id in child_ids}
