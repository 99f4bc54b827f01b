"""A Redis master, its replicas and three sentinels on loopback, for the failover tests.

Started from the same ``redis-server`` binary as the tests' other servers
(``devtools.redis_server``), the sentinels with ``--sentinel``. Sentinel rewrites its
config file as it learns the group, so each sentinel gets one of its own in a temporary
directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import redis

from devtools.processes import Process, free_port, wait_for
from devtools.redis_server import redis_server_binary, start_redis

SERVICE = "toot"


class SentinelGroup:
    """The group, with the ``redis+sentinel://`` URL toot is given for it."""

    def __init__(
        self,
        log_dir: Path | None = None,
        *,
        replicas: int = 1,
        down_after_ms: int = 1000,
        sentinels: int = 3,
    ) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="toot-sentinel-"))
        self.replicas = replicas
        self.down_after_ms = down_after_ms
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.servers: dict[int, Process] = {}  # by port: the master and the replica
        self.sentinels: list[Process] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> SentinelGroup:
        master, _ = start_redis(self.log_dir, options=["--appendonly", "no"])
        master_port = int(master.argv[master.argv.index("--port") + 1])
        self.servers[master_port] = master
        for _ in range(self.replicas):
            replica, _ = start_redis(
                self.log_dir, options=["--replicaof", "127.0.0.1", str(master_port)]
            )
            self.servers[int(replica.argv[replica.argv.index("--port") + 1])] = replica
        wait_for(lambda: self._replicas(master_port) == self.replicas, 20, "the replicas to sync")
        for n, port in enumerate(self.sentinel_ports):
            config = self.log_dir / f"sentinel-{n}.conf"
            config.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.log_dir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            process = Process(f"sentinel-{n}", [redis_server_binary(), str(config), "--sentinel"])
            self.sentinels.append(process.start())
        wait_for(self._sentinels_agree, 30, "the sentinels to see each other and the replicas")
        return self

    def master_port(self) -> int:
        """The master's port, as the first sentinel that answers says."""
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                address: Any = client.sentinel_get_master_addr_by_name(SERVICE)  # (host, port)
                return int(address[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise RuntimeError("no sentinel answers")

    def kill_master(self) -> int:
        """SIGKILL the master, as a crash; its port."""
        port = self.master_port()
        self.servers[port].kill()
        return port

    def wait_for_failover(self, old_port: int, timeout: float = 60) -> int:
        """Wait until the sentinels promoted another server and it answers as master."""

        def promoted() -> bool:
            port = self.master_port()
            return port != old_port and self._role(port) == "master"

        wait_for(promoted, timeout, "the sentinels to promote the replica", interval=0.1)
        return self.master_port()

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers.values()]:
            process.stop()

    def _replicas(self, port: int) -> int:
        client = redis.Redis(port=port, socket_timeout=1)
        try:
            info = client.info("replication")
            return int(info.get("connected_slaves", 0)) if info.get("role") == "master" else -1
        except redis.RedisError:
            return -1
        finally:
            client.close()

    def _role(self, port: int) -> str:
        client = redis.Redis(port=port, socket_timeout=1)
        try:
            return str(client.info("replication").get("role"))
        except redis.RedisError:
            return ""
        finally:
            client.close()

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                masters: Any = client.sentinel_masters()  # a dict by service name
                master = masters[SERVICE]
                seen = int(master["num-other-sentinels"]), int(master["num-slaves"])
                if seen != (len(self.sentinel_ports) - 1, self.replicas):
                    return False
            except (redis.RedisError, KeyError):
                return False
            finally:
                client.close()
        return True
