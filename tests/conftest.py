"""Shared fixtures: real redis-server processes on loopback, and link stores.

The session-wide `redis_server` is never stopped by a test. Tests that stop
or pause Redis use `private_redis_server`, which starts a server of their own.
The session-wide `redis_cluster` is a Redis Cluster of three primaries, and
`redis_sentinel` a primary with one replica, monitored by three Sentinels.
Tests that kill a primary use `replicated_cluster`, a cluster with a replica
per primary, or `private_redis_sentinel` instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio

from proxy.store import LinkStore, MemoryStore, RedisStore

LOOPBACK = "127.0.0.1"
REDIS_START_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 5.0
CLUSTER_PRIMARIES = 3
CLUSTER_CREATE_TIMEOUT_S = 30.0
CLUSTER_READY_TIMEOUT_S = 20.0
# A cluster node also listens on its port + 10000 for the cluster bus, so
# redis-server rejects a port above 55535.
CLUSTER_BUS_PORT_OFFSET = 10000
CLUSTER_MAX_PORT = 65535 - CLUSTER_BUS_PORT_OFFSET
CLUSTER_PORT_ATTEMPTS = 100
SENTINEL_COUNT = 3
SENTINEL_QUORUM = 2
SENTINEL_PRIMARY_NAME = "routes"
# Short, so that a failover completes within seconds. Sentinel finds a
# primary down after this many milliseconds without a reply to PING.
SENTINEL_DOWN_AFTER_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 5000
SENTINEL_READY_TIMEOUT_S = 20.0


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that was free when this function checked it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return `count` different TCP ports on `host` that were free when checked.

    The sockets stay bound until all ports are picked, so two calls of
    `free_port` cannot return the same port to one proxy's listeners.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_cluster_port() -> int:
    """Return a free loopback port whose cluster bus port is free too."""
    for _ in range(CLUSTER_PORT_ATTEMPTS):
        port = free_port()
        if port > CLUSTER_MAX_PORT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port + CLUSTER_BUS_PORT_OFFSET))
            except OSError:
                continue
        return port
    pytest.fail(
        f"no free port pair (port, port + {CLUSTER_BUS_PORT_OFFSET}) with port <= "
        f"{CLUSTER_MAX_PORT} found in {CLUSTER_PORT_ATTEMPTS} attempts"
    )


def _answers_ping(port: int) -> bool:
    """Return whether a Redis server on loopback `port` replies to PING."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    # A server started with --requirepass replies -NOAUTH, which still
    # proves it is serving.
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class RedisServer:
    """A redis-server child process on 127.0.0.1, without persistence.

    :param directory: working directory for the server and its log file.
    :param port: port to listen on; `stop()` and `start()` keep it.
    :param extra_args: further redis-server options, such as
        ``["--requirepass", "secret"]``.
    """

    def __init__(
        self, directory: Path, port: int, extra_args: Sequence[str] = ()
    ) -> None:
        self.directory = directory
        self.port = port
        self.extra_args = list(extra_args)
        self.log_path = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def command(self, executable: str) -> list[str]:
        """Return the redis-server command line of this server."""
        return [
            executable,
            "--bind",
            LOOPBACK,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.extra_args,
        ]

    def start(self) -> None:
        """Start the server and wait until it replies to PING."""
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(
                "redis-server not found: install it with `apt-get install redis-server`"
            )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(executable), stdout=log, stderr=subprocess.STDOUT
            )

        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while not _answers_ping(self.port):
            if self.process.poll() is not None:
                pytest.fail(
                    f"redis-server on port {self.port} exited with code "
                    f"{self.process.returncode}: {self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"redis-server on port {self.port} did not reply to PING within "
                    f"{REDIS_START_TIMEOUT_S} s: {self._log_tail()}"
                )
            time.sleep(0.02)

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would end it."""
        process = self.process
        assert process is not None, "redis-server is not running"
        self.process = None
        process.kill()
        process.wait(REDIS_STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Terminate the server, and kill it if it does not exit in time."""
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is not None:
            return
        # A paused server would hold SIGTERM until it resumes.
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(REDIS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(REDIS_STOP_TIMEOUT_S)

    def pause(self) -> None:
        """Stop the server process with SIGSTOP: it accepts, but never replies."""
        assert self.process is not None, "redis-server is not running"
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a server that `pause()` stopped."""
        assert self.process is not None, "redis-server is not running"
        os.kill(self.process.pid, signal.SIGCONT)

    def _log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace")
        return text[-2000:] or "(empty log)"


class RedisCluster:
    """A Redis Cluster of `CLUSTER_PRIMARIES` primaries on 127.0.0.1.

    :param directory: working directory of the nodes, for their logs and
        cluster config files.
    :param replicas: replicas of each primary.
    :param node_timeout_ms: ``cluster-node-timeout``, after which the
        replicas of an unreachable primary start a failover; None keeps the
        redis-server default of 15 s.
    """

    def __init__(
        self, directory: Path, replicas: int = 0, node_timeout_ms: int | None = None
    ) -> None:
        self.directory = directory
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        addresses = ",".join(f"{LOOPBACK}:{node.port}" for node in self.nodes)
        return f"redis+cluster://{addresses}/"

    def start(self) -> None:
        """Start the nodes, join them into one cluster and wait for state ok."""
        redis_cli = shutil.which("redis-cli")
        if redis_cli is None:
            pytest.fail(
                "redis-cli not found: install it with `apt-get install redis-tools` "
                "(Debian's redis-server package depends on it)"
            )
        for _ in range(CLUSTER_PRIMARIES * (1 + self.replicas)):
            port = free_cluster_port()
            node_directory = self.directory / f"node-{port}"
            node_directory.mkdir()
            options = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node_directory / f"nodes-{port}.conf"),
            ]
            if self.node_timeout_ms is not None:
                options += ["--cluster-node-timeout", str(self.node_timeout_ms)]
            node = RedisServer(node_directory, port, options)
            self.nodes.append(node)
            node.start()

        addresses = [f"{LOOPBACK}:{node.port}" for node in self.nodes]
        command = [redis_cli, "--cluster", "create", *addresses]
        command += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        try:
            created = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=CLUSTER_CREATE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"redis-cli --cluster create timed out after "
                f"{CLUSTER_CREATE_TIMEOUT_S} s"
            )
        if created.returncode != 0:
            pytest.fail(
                f"redis-cli --cluster create failed with code {created.returncode}: "
                f"{created.stdout[-2000:]}{created.stderr[-2000:]}"
            )
        self._wait_until_ok(redis_cli)

    def _wait_until_ok(self, redis_cli: str) -> None:
        """Wait until every node reports cluster_state:ok in CLUSTER INFO."""
        deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_S
        pending = list(self.nodes)
        while pending:
            node = pending[0]
            info = subprocess.run(
                [redis_cli, "-h", LOOPBACK, "-p", str(node.port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=REDIS_STOP_TIMEOUT_S,
                check=False,
            )
            if "cluster_state:ok" in info.stdout:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Redis Cluster node on port {node.port} did not report "
                    f"cluster_state:ok within {CLUSTER_READY_TIMEOUT_S} s: "
                    f"{info.stdout.strip()}"
                )
            time.sleep(0.05)

    def replicas_of(self) -> dict[int, list[int]]:
        """Return the ports of the replicas of each primary, by primary port.

        Read from CLUSTER NODES of the first node that replies, so a killed
        node is skipped.
        """
        for node in self.nodes:
            if node.process is None:
                continue
            lines = redis_cli_output(node.port, "cluster", "nodes").splitlines()
            if lines:
                break
        else:
            pytest.fail("no Redis Cluster node replied to CLUSTER NODES")
        ports: dict[str, int] = {}
        primaries: dict[str, str] = {}
        for line in lines:
            # <id> <ip:port@bus-port> <flags> <primary id or -> ...
            fields = line.split()
            ports[fields[0]] = int(fields[1].split("@")[0].rpartition(":")[2])
            flags = fields[2].split(",")
            if "master" in flags and "fail" not in flags:
                primaries.setdefault(fields[0], fields[0])
            elif "slave" in flags:
                primaries[fields[0]] = fields[3]
        replicas: dict[int, list[int]] = {}
        for node_id, primary_id in primaries.items():
            primary_port = ports[primary_id]
            replicas.setdefault(primary_port, [])
            if node_id != primary_id:
                replicas[primary_port].append(ports[node_id])
        return replicas

    def node(self, port: int) -> RedisServer:
        """Return the node that listens on `port`."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    def stop(self) -> None:
        """Stop every node that `start()` started."""
        for node in self.nodes:
            node.stop()


def _redis_cli() -> str:
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        pytest.fail(
            "redis-cli not found: install it with `apt-get install redis-tools` "
            "(Debian's redis-server package depends on it)"
        )
    return redis_cli


def redis_cli_output(port: int, *arguments: str) -> str:
    """Run one redis-cli command against loopback `port` and return its output."""
    completed = subprocess.run(
        [_redis_cli(), "-h", LOOPBACK, "-p", str(port), *arguments],
        capture_output=True,
        text=True,
        timeout=REDIS_STOP_TIMEOUT_S,
        check=False,
    )
    return completed.stdout


class SentinelProcess(RedisServer):
    """A ``redis-server --sentinel`` process that monitors one primary.

    Sentinel rewrites its configuration file, so each process gets its own.
    """

    def __init__(self, directory: Path, port: int, primary_port: int) -> None:
        super().__init__(directory, port)
        self.config_path = directory / "sentinel.conf"
        name = SENTINEL_PRIMARY_NAME
        self.config_path.write_text(
            f"port {port}\n"
            f"bind {LOOPBACK}\n"
            f"dir {directory}\n"
            f"sentinel monitor {name} {LOOPBACK} {primary_port} {SENTINEL_QUORUM}\n"
            f"sentinel down-after-milliseconds {name} {SENTINEL_DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {name} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )

    def command(self, executable: str) -> list[str]:
        return [executable, str(self.config_path), "--sentinel"]


class RedisSentinelSet:
    """A primary, one replica and `SENTINEL_COUNT` Sentinels on 127.0.0.1.

    :param directory: working directory of the processes, for their logs
        and the Sentinel configuration files.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.primary = RedisServer(self._mkdir("primary"), free_port())
        self.replica = RedisServer(
            self._mkdir("replica"),
            free_port(),
            ["--replicaof", LOOPBACK, str(self.primary.port)],
        )
        self.sentinels = [
            SentinelProcess(self._mkdir(f"sentinel-{number}"), port, self.primary.port)
            for number, port in enumerate(free_port() for _ in range(SENTINEL_COUNT))
        ]

    def _mkdir(self, name: str) -> Path:
        path = self.directory / name
        path.mkdir()
        return path

    @property
    def url(self) -> str:
        addresses = ",".join(f"{LOOPBACK}:{node.port}" for node in self.sentinels)
        return f"redis+sentinel://{addresses}/{SENTINEL_PRIMARY_NAME}/0"

    def start(self) -> None:
        """Start every process and wait until each Sentinel lists the whole set."""
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        for sentinel in self.sentinels:
            self._wait_until_discovered(sentinel)

    def _wait_until_discovered(self, sentinel: SentinelProcess) -> None:
        """Wait until `sentinel` has discovered the replica and the other Sentinels.

        A failover needs a majority of Sentinels that have discovered each other.
        """
        deadline = time.monotonic() + SENTINEL_READY_TIMEOUT_S
        expected = {
            "num-slaves": "1",
            "num-other-sentinels": str(SENTINEL_COUNT - 1),
        }
        while True:
            output = redis_cli_output(
                sentinel.port, "sentinel", "master", SENTINEL_PRIMARY_NAME
            )
            lines = output.split()
            state = dict(zip(lines[0::2], lines[1::2], strict=False))
            if all(state.get(key) == value for key, value in expected.items()):
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Sentinel on port {sentinel.port} did not see one replica and "
                    f"{SENTINEL_COUNT - 1} other Sentinels within "
                    f"{SENTINEL_READY_TIMEOUT_S} s: {output.strip()!r}"
                )
            time.sleep(0.1)

    def primary_port(self) -> int | None:
        """Return the port of the primary that the first Sentinel reports."""
        output = redis_cli_output(
            self.sentinels[0].port,
            "sentinel",
            "get-master-addr-by-name",
            SENTINEL_PRIMARY_NAME,
        ).split()
        if len(output) != 2 or not output[1].isdigit():
            return None
        return int(output[1])

    def stop(self) -> None:
        """Stop every process that `start()` started."""
        for server in [*self.sentinels, self.replica, self.primary]:
            server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster shared by the whole session; tests never stop it."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A Redis Cluster of one test with a replica per primary, which it may kill.

    The 1 s node timeout lets a replica take over within seconds.
    """
    cluster = RedisCluster(tmp_path / "cluster", replicas=1, node_timeout_ms=1000)
    cluster.directory.mkdir()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def cluster_clients(
    redis_cluster: RedisCluster,
) -> AsyncIterator[list[redis.asyncio.Redis]]:
    """One plain client per cluster primary, after FLUSHALL on each."""
    clients = [
        redis.asyncio.Redis(host=LOOPBACK, port=node.port, decode_responses=True)
        for node in redis_cluster.nodes
    ]
    try:
        for client in clients:
            await client.flushall()
        yield clients
    finally:
        for client in clients:
            await client.aclose()


@pytest.fixture
async def cluster_store(
    redis_cluster: RedisCluster, cluster_clients: list[redis.asyncio.Redis]
) -> AsyncIterator[RedisStore]:
    """A RedisStore on the shared cluster, which starts empty.

    It depends on `cluster_clients` for the FLUSHALL.
    """
    store = RedisStore(redis_cluster.url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(scope="session")
def redis_sentinel(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisSentinelSet]:
    """A Sentinel-monitored primary shared by the session; tests never stop it."""
    sentinel_set = RedisSentinelSet(tmp_path_factory.mktemp("redis-sentinel"))
    try:
        sentinel_set.start()
        yield sentinel_set
    finally:
        sentinel_set.stop()


@pytest.fixture
def private_redis_sentinel(tmp_path: Path) -> Iterator[RedisSentinelSet]:
    """A Sentinel-monitored primary of one test, which may kill its processes."""
    sentinel_set = RedisSentinelSet(tmp_path)
    try:
        sentinel_set.start()
        yield sentinel_set
    finally:
        sentinel_set.stop()


@pytest.fixture
async def sentinel_store(
    redis_sentinel: RedisSentinelSet,
) -> AsyncIterator[RedisStore]:
    """A RedisStore on the shared Sentinel set, whose database starts empty."""
    async with redis.asyncio.Redis(
        host=LOOPBACK, port=redis_sentinel.primary.port
    ) as client:
        await client.flushall()
    store = RedisStore(redis_sentinel.url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the whole session; tests never stop it."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


RedisServerFactory = Callable[..., RedisServer]


@pytest.fixture
def redis_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisServerFactory]:
    """Start redis-servers of one test only; all are stopped after the test.

    Call it with redis-server options, such as ``"--requirepass", "secret"``.
    The test may stop, pause and restart the servers it gets.
    """
    servers: list[RedisServer] = []

    def start(*extra_args: str) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis"), free_port(), extra_args)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def private_redis_server(redis_server_factory: RedisServerFactory) -> RedisServer:
    """A redis-server of one test only, which the test may stop and restart."""
    return redis_server_factory()


@pytest.fixture
async def redis_client(
    redis_server: RedisServer,
) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client of the shared server, after FLUSHDB, to inspect keys."""
    client = redis.asyncio.from_url(redis_server.url, decode_responses=True)
    try:
        await client.flushdb()
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_store(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> AsyncIterator[RedisStore]:
    """A RedisStore on the shared server, whose database starts empty.

    It depends on `redis_client` for the FLUSHDB.
    """
    store = RedisStore(redis_server.url)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def memory_store() -> AsyncIterator[MemoryStore]:
    store = MemoryStore()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
def store(request: pytest.FixtureRequest) -> LinkStore:
    """Each link store in turn, for tests of the behaviour that both share."""
    selected: LinkStore = request.getfixturevalue(f"{request.param}_store")
    return selected
