"""Shared fixtures: real redis-server processes on loopback, and link stores.

The session-wide `redis_server` is never stopped by a test. Tests that stop
or pause Redis use `private_redis_server`, which starts a server of their own.
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


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that was free when this function checked it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> LinkStore:
    """Each link store in turn, for tests of the behaviour that both share."""
    selected: LinkStore = request.getfixturevalue(f"{request.param}_store")
    return selected
