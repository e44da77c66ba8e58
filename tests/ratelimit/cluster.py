"""A real Redis Cluster for tests: three redis-server masters in cluster mode on free loopback ports,
joined with `redis-cli --cluster create`, and the helpers tests use to look inside it. With `tls` the nodes
listen on TLS alone, and talk TLS to each other too (cluster bus, MIGRATE, replication)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from igw.procs import RedisServer, RedisTlsFiles, free_port, redis_server_binary


def _current_epoch(client: redis.Redis) -> int:
    info = client.execute_command("CLUSTER", "INFO")
    if isinstance(info, bytes | str):  # unparsed by this redis-py: "key:value" lines
        text = info.decode() if isinstance(info, bytes) else info
        info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(info["cluster_current_epoch"])


def redis_tls_missing() -> str | None:
    """Why this machine's redis-server cannot serve TLS, or None when it can: the TLS tests skip naming it
    rather than fail at a server that never listens. A build without TLS does not know the tls-port directive;
    one with it rejects the bad value given here, so either way the probe exits at once."""
    probe = subprocess.run([redis_server_binary(), "--tls-port", "not-a-port"], capture_output=True, text=True,
                           timeout=10)
    if "Bad directive" in probe.stdout + probe.stderr:
        version = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        return f"redis-server was built without TLS support (no tls-port directive; BUILD_TLS=yes needed): {version}"
    return None


class RedisClusterProcs:
    """Masters of one cluster (no replicas). `require_full_coverage=False` lets the surviving masters keep
    serving their slots when one dies, as managed cluster-mode Redis is often set up; with the default,
    every node answers CLUSTERDOWN a node timeout after a master fails. `extra_args` go to every
    redis-server (e.g. `--cluster-preferred-endpoint-type unknown-endpoint`). With `tls`, plain port 0:
    the test's own clients (redis-py, redis-cli) present the nodes' certificate, which is a client
    certificate too, so `tls.auth_clients` may be on."""

    def __init__(self, log_dir: Path, masters: int = 3, *, require_full_coverage: bool = True,
                 extra_args: Sequence[str] = (), tls: RedisTlsFiles | None = None) -> None:
        self.tls = tls
        self.servers = [RedisServer(log_dir=log_dir, tls=tls) for _ in range(masters)]
        tls_args = ["--tls-cluster", "yes", "--tls-replication", "yes"] if tls is not None else []
        for server in self.servers:
            server.name = f"redis-cluster-{server.port}"
            server.log_path = Path(log_dir) / f"{server.name}.log"
            server.args += ["--cluster-enabled", "yes",
                            "--cluster-config-file", str(server.data_dir / f"nodes-{server.port}.conf"),
                            "--cluster-node-timeout", "2000",
                            # The bus port is the data port + 10000 unless given: take a free one too.
                            "--cluster-port", str(free_port()),
                            "--cluster-require-full-coverage", "yes" if require_full_coverage else "no",
                            *tls_args, *extra_args]
        self._clients: dict[int, redis.Redis] = {}

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def seeds(self) -> str:
        """REDIS_URL in upstream's cluster form."""
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self) -> RedisClusterProcs:
        for server in self.servers:
            server.start()
        if len(self.servers) == 1:  # redis-cli --cluster create wants three masters at least
            self.client(self.ports[0]).execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        else:
            cli = shutil.which("redis-cli")
            assert cli, "redis-cli not found (Debian package redis-tools)"
            subprocess.run([cli, *self.cli_tls_args(), "--cluster", "create",
                            *(f"127.0.0.1:{port}" for port in self.ports), "--cluster-replicas", "0",
                            "--cluster-yes"], check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in self.client(port).execute_command("CLUSTER", "INFO")
                      for port in self.ports):
            assert time.monotonic() < deadline, "cluster not ok after 20 s"
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        for server in self.servers:
            server.stop()

    def cli_tls_args(self) -> list[str]:
        """redis-cli's options for the nodes: none for plain ones."""
        if self.tls is None:
            return []
        return ["--tls", "--cacert", str(self.tls.ca_file), "--cert", str(self.tls.cert_file),
                "--key", str(self.tls.key_file)]

    def client(self, port: int) -> redis.Redis:
        if port not in self._clients:
            tls: dict[str, object] = {}
            if self.tls is not None:
                # The chain is checked, not the name: a test may give the nodes a certificate that does not
                # name 127.0.0.1, to see the service refuse it.
                tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca_file), "ssl_certfile": str(self.tls.cert_file),
                       "ssl_keyfile": str(self.tls.key_file), "ssl_check_hostname": False}
            self._clients[port] = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, **tls)
        return self._clients[port]

    def node_id(self, port: int) -> str:
        return self.client(port).execute_command("CLUSTER", "MYID").decode()

    def slot_of(self, key: str) -> int:
        return int(self.client(self.ports[0]).execute_command("CLUSTER", "KEYSLOT", key))

    def owner_of(self, slot: int) -> int:
        """The port of the master that holds `slot`, as the cluster itself says."""
        for start, end, master, *_ in self.client(self.ports[0]).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise AssertionError(f"slot {slot} is not assigned")

    def wait_agreed(self, slot: int, port: int, timeout: float = 10) -> None:
        """Until every master says `port` holds `slot` and all share one current epoch. Two migrations of a
        slot in a row race the cluster bus otherwise: a master that has not heard of the first one's epoch
        bump may not bump its own for the second, and gossip then hands the slot back to the first target."""
        deadline = time.monotonic() + timeout
        while True:
            owners, epochs = set(), set()
            for node in self.ports:
                epochs.add(_current_epoch(self.client(node)))
                owners.update(int(master[1]) for start, end, master, *_ in
                              self.client(node).execute_command("CLUSTER", "SLOTS") if start <= slot <= end)
            if owners == {port} and len(epochs) == 1:
                return
            assert time.monotonic() < deadline, f"slot {slot}: masters say {owners}, epochs {epochs}"
            time.sleep(0.02)

    def owners(self) -> list[int]:
        """The port of each slot's master, from one CLUSTER SLOTS."""
        owners = [0] * 16384
        for start, end, master, *_ in self.client(self.ports[0]).execute_command("CLUSTER", "SLOTS"):
            owners[start:end + 1] = [int(master[1])] * (end + 1 - start)
        return owners

    def keys_on(self, port: int, pattern: str = "*") -> list[str]:
        return sorted(key.decode() for key in self.client(port).keys(pattern))

    def migrate_slot(self, slot: int, to_port: int, *, finish: bool = True) -> int:
        """Move `slot` (and its keys) to the master on `to_port`, as redis-cli --cluster reshard does:
        IMPORTING/MIGRATING, MIGRATE every key, then (finish) SETSLOT NODE on every master. Returns the port
        it came from. Without `finish` the slot stays half migrated: its keys are on `to_port`, and the old
        owner answers ASK for them."""
        source = self.begin_migration(slot, to_port)
        src = self.client(source)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            self.migrate_keys(source, to_port, [key.decode() for key in keys])
        if finish:
            self.finish_migration(slot, to_port)
        return source

    def begin_migration(self, slot: int, to_port: int) -> int:
        """Mark `slot` IMPORTING on `to_port` and MIGRATING on its owner, moving no key yet; returns the
        owner's port. Until the keys are moved, the owner serves the keys it has and answers ASK for others."""
        source = self.owner_of(slot)
        self.client(to_port).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        self.client(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to_port))
        return source

    def migrate_keys(self, source: int, to_port: int, keys: Sequence[str]) -> None:
        self.client(source).execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)

    def get_asking(self, port: int, key: str) -> int:
        """The counter `key` on the master at `port`, read as a client redirected there by ASK would."""
        pipe = self.client(port).pipeline(transaction=False)
        pipe.execute_command("ASKING").get(key)
        value = pipe.execute()[1]
        return int(value) if value is not None else 0

    def finish_migration(self, slot: int, to_port: int) -> None:
        target_id = self.node_id(to_port)
        for port in [to_port, *(p for p in self.ports if p != to_port)]:
            with contextlib.suppress(redis.ConnectionError):
                self.client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def flush(self) -> None:
        for port in self.ports:
            with contextlib.suppress(redis.ConnectionError):
                self.client(port).flushall()
