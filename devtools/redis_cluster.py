"""A Redis Cluster on loopback: three masters, each with a replica, for the Cluster tests.

Started from the same ``redis-server`` binary as the tests' other servers
(``devtools.redis_server``) with ``--cluster-enabled yes``, and joined with
``redis-cli --cluster create`` (Debian's ``redis-tools``). Each node writes its cluster
config file in a directory of its own. ``python -m devtools.redis_cluster`` starts one and
prints its ``redis+cluster://`` URL, for a test pass against it (``.ci/run``).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import redis

from devtools.processes import Process, wait_for
from devtools.redis_server import start_redis


class Cluster:
    """The cluster's nodes, with the ``redis+cluster://`` URL toot is given for it."""

    def __init__(
        self, log_dir: Path | None = None, *, masters: int = 3, node_timeout_ms: int = 1000
    ) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="toot-cluster-"))
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.nodes: dict[int, Process] = {}  # by port

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in list(self.nodes)[: self.masters])
        return f"redis+cluster://{hosts}"

    def start(self) -> Cluster:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("no redis-cli: install Debian's redis-tools")
        for n in range(2 * self.masters):  # a replica per master
            directory = self.log_dir / f"node-{n}"
            directory.mkdir(parents=True, exist_ok=True)
            process, _ = start_redis(
                self.log_dir,
                _cluster_port(),
                options=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(directory / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    "--dir",
                    str(directory),
                ],
            )
            self.nodes[int(process.argv[process.argv.index("--port") + 1])] = process
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_for(self._ready, 60, "the cluster to cover its slots, a replica per master")
        return self

    def masters_ports(self) -> list[int]:
        return [port for port in self.nodes if self._role(port) == "master"]

    def kill_master_of(self, key: str) -> int:
        """SIGKILL the master that serves ``key``'s slot, as a crash; its port."""
        client = redis.Redis(port=next(iter(self.masters_ports())), socket_timeout=1)
        try:
            slot = int(client.cluster("keyslot", key))
            port = next(
                int(entry[2][1])
                for entry in client.cluster("slots")
                if int(entry[0]) <= slot <= int(entry[1])
            )
        finally:
            client.close()
        self.nodes[port].kill()
        return port

    def wait_for_failover(self, old_port: int, timeout: float = 60) -> None:
        """Wait until a replica took over the slots of ``old_port`` and the cluster is ok."""

        def promoted() -> bool:
            alive = [port for port in self.nodes if port != old_port]
            return len([p for p in alive if self._role(p) == "master"]) == self.masters and all(
                self._state_ok(port) for port in alive
            )

        wait_for(promoted, timeout, "a replica to take over the dead master's slots", interval=0.1)

    def stop(self) -> None:
        for process in self.nodes.values():
            process.stop()

    def _ready(self) -> bool:
        return (
            all(self._state_ok(port) for port in self.nodes)
            and len(self.masters_ports()) == self.masters
            and all(self._replicas(port) == 1 for port in self.masters_ports())
        )

    def _info(self, port: int, section: str) -> dict[str, object]:
        client = redis.Redis(port=port, socket_timeout=1)
        try:
            info: dict[str, object] = client.info(section)
            return info
        except redis.RedisError:
            return {}
        finally:
            client.close()

    def _state_ok(self, port: int) -> bool:
        client = redis.Redis(port=port, socket_timeout=1)
        try:
            return bool(client.cluster("info").get("cluster_state") == "ok")
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _role(self, port: int) -> str:
        return str(self._info(port, "replication").get("role", ""))

    def _replicas(self, port: int) -> int:
        return int(str(self._info(port, "replication").get("connected_slaves", 0)))


def _cluster_port() -> int:
    """A free port whose cluster bus port, 10,000 higher, is free too (so at most 55535)."""
    for _ in range(100):
        port = random.randrange(20000, 55536)
        with contextlib.ExitStack() as stack:
            try:
                for candidate in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return port
    raise RuntimeError("no free pair of ports for a cluster node")


def main() -> None:
    """Start a cluster, print its URL, and stop it on SIGTERM or SIGINT (its nodes also
    stop if this process dies)."""
    cluster = Cluster().start()
    print(cluster.url, flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
