"""Start, watch and stop child processes (Redis, web servers, Celery workers) and wait for them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1
# What a Celery worker logs once it consumes.
WORKER_READY = " ready."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true, or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Linux: the child gets SIGTERM when the thread that started it dies, so that a
    # test run killed with -9 leaves no server behind. (The *thread*: start children from
    # a thread that outlives them, e.g. the main thread.)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setsid()


class Process:
    """One child process with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        log_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="toot-"))
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        log.close()
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        def seen() -> bool:
            if not self.running:
                raise RuntimeError(f"{self.name} exited early:\n{self.log()[-3000:]}")
            return text in self.log()

        wait_for(seen, timeout, f"{self.name} to log {text!r}")

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process and every process it started."""
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def stop(self, timeout: float = 15) -> None:
        if not self.running:
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.kill()
        self.signal(signal.SIGKILL)  # anything the leader left behind


def http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - loopback only
        except urllib.error.HTTPError:
            return True  # it answered
        except OSError:
            return False
        return True

    return check


def celery_worker_argv(
    app: str, hostname: str, concurrency: int, pool: str = "prefork", loglevel: str = "INFO"
) -> list[str]:
    """A Celery worker of ``app``, without the gossip, mingle and heartbeat it does not need."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "--loglevel",
        loglevel,
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--hostname",
        hostname,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def wait_for_http(process: Process, url: str, timeout: float = 60) -> None:
    """Wait until ``url`` answers, or raise with the log if ``process`` exits first."""

    def up() -> bool:
        if not process.running:
            raise RuntimeError(f"{process.name} exited early:\n{process.log()[-3000:]}")
        return http_ready(url)()

    wait_for(up, timeout, f"{process.name} at {url}")
