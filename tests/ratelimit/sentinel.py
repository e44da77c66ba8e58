"""A real Redis Sentinel deployment for tests: a master redis-server, a replica of it (`--replicaof`) and
sentinels (`redis-server <conf> --sentinel`) monitoring it as `mymaster`, all on free loopback ports; with
`tls`, every one of them on TLS alone, replication and the sentinels' own connections included."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import hiredis
import redis

from igw.procs import ManagedProcess, RedisServer, RedisTlsFiles, free_port, port_open, redis_server_binary

MASTER_NAME = "mymaster"


class SentinelProcs:
    """`password`: requirepass of the master and the replica (REDIS_AUTH); `sentinel_password`: requirepass
    of the sentinels (REDIS_SENTINEL_AUTH). Short down-after and failover timeouts, so a failover takes a
    second or two. `tls`: plain port 0 everywhere (tls-replication, so the replica and the sentinels reach
    the master over TLS too); the test's own clients present the servers' certificate, a client one too."""

    def __init__(self, log_dir: Path, sentinels: int = 1, *, password: str | None = None,
                 sentinel_password: str | None = None, tls: RedisTlsFiles | None = None) -> None:
        self.password = password
        self.sentinel_password = sentinel_password
        self.tls = tls
        server_args = ["--requirepass", password, "--masterauth", password] if password else []
        if tls is not None:
            server_args += ["--tls-replication", "yes"]
        self.master = RedisServer(log_dir=log_dir, tls=tls)
        self.replica = RedisServer(log_dir=log_dir, tls=tls)
        for server, role in ((self.master, "master"), (self.replica, "replica")):
            server.name = f"redis-sentinel-{role}-{server.port}"
            server.log_path = Path(log_dir) / f"{server.name}.log"
            server.args += [*server_args, "--enable-debug-command", "local",  # DEBUG RELOAD: a master LOADING
                            # A master waits 5 s by default for more replicas before a diskless full sync.
                            "--repl-diskless-sync-delay", "0"]
        self.replica.args += ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.conf_dir = Path(tempfile.mkdtemp(prefix="igw-sentinel-"))
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinels: list[ManagedProcess] = []
        for port in self.sentinel_ports:
            conf = self.conf_dir / f"sentinel-{port}.conf"
            listen = [f"port {port}"]
            if tls is not None:
                listen = ["port 0", f"tls-port {port}", f"tls-cert-file {Path(tls.cert_file).resolve()}",
                          f"tls-key-file {Path(tls.key_file).resolve()}",
                          f"tls-ca-cert-file {Path(tls.ca_file).resolve()}",
                          f"tls-auth-clients {'yes' if tls.auth_clients else 'no'}", "tls-replication yes"]
            lines = [*listen, "bind 127.0.0.1", f"dir {self.conf_dir}",
                     f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 1",
                     f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
                     f"sentinel failover-timeout {MASTER_NAME} 3000"]
            if password:
                lines.append(f"sentinel auth-pass {MASTER_NAME} {password}")
            if sentinel_password:
                lines.append(f"requirepass {sentinel_password}")
            conf.write_text("\n".join(lines) + "\n")
            self.sentinels.append(ManagedProcess(f"redis-sentinel-{port}", [redis_server_binary(), str(conf),
                                                                             "--sentinel"], log_dir=log_dir))
        self._clients: dict[int, redis.Redis] = {}

    @property
    def url(self) -> str:
        """REDIS_URL in upstream's sentinel form."""
        return ",".join([MASTER_NAME, *(f"127.0.0.1:{port}" for port in self.sentinel_ports)])

    def start(self) -> SentinelProcs:
        self.master.start()
        self.replica.start()
        self._wait(lambda: self.client(self.replica.port).info("replication").get("master_link_status") == "up",
                   "replica not linked to the master")
        for sentinel, port in zip(self.sentinels, self.sentinel_ports, strict=True):
            sentinel.start()
            sentinel.wait_ready(lambda port=port: port_open("127.0.0.1", port), 10, "listening")
        for port in self.sentinel_ports:  # a sentinel must know the replica before it can fail over to it
            self._wait(lambda port=port: self.sentinel_client(port).execute_command(
                "SENTINEL", "REPLICAS", MASTER_NAME), "sentinel has not found the replica")
        return self

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.master.stop()
        shutil.rmtree(self.conf_dir, ignore_errors=True)

    def _tls_kwargs(self) -> dict[str, object]:
        if self.tls is None:
            return {}
        return {"ssl": True, "ssl_ca_certs": str(self.tls.ca_file), "ssl_certfile": str(self.tls.cert_file),
                "ssl_keyfile": str(self.tls.key_file)}

    def client(self, port: int) -> redis.Redis:
        if port not in self._clients:
            self._clients[port] = redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=2,
                                              **self._tls_kwargs())
        return self._clients[port]

    def sentinel_client(self, port: int) -> redis.Redis:
        key = -port
        if key not in self._clients:
            self._clients[key] = redis.Redis(host="127.0.0.1", port=port, password=self.sentinel_password,
                                             socket_timeout=2, **self._tls_kwargs())
        return self._clients[key]

    def master_port(self) -> int:
        """The master's port as the first sentinel says."""
        _, port = self.sentinel_client(self.sentinel_ports[0]).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def failover(self) -> None:
        """SENTINEL FAILOVER: the replica becomes the master and the old master its replica; returns once
        the sentinel names the new master and it answers as one."""
        old = self.master_port()
        # Replication is asynchronous: a failover keeps only the writes that reached the replica. Tests
        # compare counts across it, so every write made so far must have been acknowledged first.
        acknowledged = self.client(old).execute_command("WAIT", 1, 5000)
        assert acknowledged == 1, "the replica did not acknowledge the writes so far within 5 s"
        deadline = time.monotonic() + 15
        while True:
            try:
                self.sentinel_client(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
                break
            except redis.ResponseError as exc:  # just started: the sentinel has not rated the replica yet
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self._wait(lambda: self.master_port() != old, "the sentinel did not switch to the replica", 20)
        new = self.master_port()
        self._wait(lambda: self.client(new).execute_command("ROLE")[0] == b"master", "new master not promoted")

    def get(self, port: int, key: str) -> int:
        value = self.client(port).get(key)
        return int(value) if value is not None else 0

    def flush(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.client(self.master_port()).flushall()

    @staticmethod
    def _wait(check: object, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError):
                if check():  # type: ignore[operator]
                    return
            assert time.monotonic() < deadline, what
            time.sleep(0.1)


class StaleSentinel:
    """A sentinel that names `port` as the master whatever has happened since, as one cut off from the others
    by a partition keeps doing: it answers every command with that address. A thread, so a test can list it
    first in REDIS_URL next to the real sentinel."""

    def __init__(self, port: int) -> None:
        self.named = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.asked = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        port = str(self.named).encode()
        reply = b"*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%s\r\n" % (len(port), port)
        reader = hiredis.Reader()
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(4096):
                reader.feed(data)
                while reader.gets() is not False:
                    self.asked += 1
                    conn.sendall(reply)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
