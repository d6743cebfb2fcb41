"""Shared fixtures: real redis-server processes on loopback, and link stores.

The session-wide `redis_server` is never stopped by a test. Tests that stop
or pause Redis use `private_redis_server`, which starts a server of their own.
The session-wide `redis_cluster` is a Redis Cluster of three primaries.
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


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that was free when this function checked it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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

    def start(self) -> None:
        """Start the server and wait until it replies to PING."""
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(
                "redis-server not found: install it with `apt-get install redis-server`"
            )
        command = [
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
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT
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
    """A Redis Cluster of `CLUSTER_PRIMARIES` primaries on 127.0.0.1, no replicas.

    :param directory: working directory of the nodes, for their logs and
        cluster config files.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
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
        for _ in range(CLUSTER_PRIMARIES):
            port = free_cluster_port()
            node_directory = self.directory / f"node-{port}"
            node_directory.mkdir()
            node = RedisServer(
                node_directory,
                port,
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_directory / f"nodes-{port}.conf"),
                ],
            )
            self.nodes.append(node)
            node.start()

        addresses = [f"{LOOPBACK}:{node.port}" for node in self.nodes]
        command = [redis_cli, "--cluster", "create", *addresses]
        command += ["--cluster-replicas", "0", "--cluster-yes"]
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

    def stop(self) -> None:
        """Stop every node that `start()` started."""
        for node in self.nodes:
            node.stop()


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


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request: pytest.FixtureRequest) -> LinkStore:
    """Each link store in turn, for tests of the behaviour that both share."""
    selected: LinkStore = request.getfixturevalue(f"{request.param}_store")
    return selected
