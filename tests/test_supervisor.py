"""``stateful-route run --workers N``: a supervisor and N worker processes.

The workers share the proxy port through SO_REUSEPORT and serve the admin
API on ``admin.port + i``. The tests run the real command line in front of
real pod processes and a real redis-server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from conftest import LOOPBACK, RedisServer, free_port
from test_e2e import (
    CLIENT_TIMEOUT,
    POD_COUNT,
    PodProcess,
    log_tail,
    proxy_document,
    request_json,
    routing_headers,
    run_cli,
    spawn,
    start_pods,
    stop_pods,
    stop_process,
    write_config,
)

WORKERS = 2
READY_TIMEOUT_S = 20.0
REQUESTS = 200


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[PodProcess]]:
    started = start_pods(POD_COUNT, tmp_path_factory.mktemp("pods"))
    try:
        yield started
    finally:
        stop_pods(started)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # A new connection per request, so the kernel spreads them over workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        timeout=CLIENT_TIMEOUT, connector=connector
    ) as session:
        yield session


def free_port_run(count: int) -> int:
    """Return a port p such that p to p + count - 1 were free when checked."""
    for _ in range(100):
        first = free_port()
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((LOOPBACK, port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    pytest.fail(f"no {count} consecutive free ports found")


async def admin_status(
    client: aiohttp.ClientSession, admin_port: int
) -> dict[str, Any] | None:
    try:
        reply = await request_json(
            client, f"http://{LOOPBACK}:{admin_port}/v1/status", {}
        )
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None
    if reply.status != 200:
        return None
    body: dict[str, Any] = reply.body
    return body


async def wait_for_workers(
    client: aiohttp.ClientSession,
    admin_port: int,
    process: Any,
    log_path: Path,
    exclude_pids: set[int] = frozenset(),  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    """Poll each worker's admin API until all respond; return their status."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"supervisor exited with {process.returncode}: {log_tail(log_path)}"
            )
        bodies = [
            await admin_status(client, admin_port + index) for index in range(WORKERS)
        ]
        ready = [body for body in bodies if body is not None]
        if len(ready) == WORKERS and not {b["pid"] for b in ready} & exclude_pids:
            return ready
        if time.monotonic() > deadline:
            pytest.fail(
                f"workers not ready in {READY_TIMEOUT_S} s: {log_tail(log_path)}"
            )
        await asyncio.sleep(0.05)


@pytest.fixture
def group_config(
    tmp_path: Path,
    pods: list[PodProcess],
    redis_server: RedisServer,
) -> tuple[Path, int, int]:
    """Write a configuration for two workers; return it with its two ports."""
    document = proxy_document(pods, redis_server.url)
    port = free_port()
    admin_port = free_port_run(WORKERS)
    document["proxy"]["port"] = port
    document["proxy"]["workers"] = WORKERS
    document["admin"]["port"] = admin_port
    return write_config(tmp_path, document, "workers.toml"), port, admin_port


async def test_workers_share_port_and_stop(
    tmp_path: Path,
    group_config: tuple[Path, int, int],
    client: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    config_path, port, admin_port = group_config
    log_path = tmp_path / "supervisor.log"
    command = [sys.executable, "-m", "proxy", "run", "--config", str(config_path)]
    process = spawn(command, log_path)
    try:
        workers = await wait_for_workers(client, admin_port, process, log_path)
        pids = {body["pid"] for body in workers}
        assert len(pids) == WORKERS
        assert sorted(body["worker"] for body in workers) == list(range(WORKERS))

        for number in range(REQUESTS):
            reply = await request_json(
                client, f"http://{LOOPBACK}:{port}", routing_headers(f"u{number}")
            )
            assert reply.status == 200, reply.body
        workers = await wait_for_workers(client, admin_port, process, log_path)
        for body in workers:
            cache = body["local_cache"]
            routed = cache["hits"] + cache["misses"]
            assert routed > 0, f"worker {body['worker']} routed no request"

        code = stop_process(process, signal.SIGTERM)
        assert code == 0, log_tail(log_path)
        for pid in pids:
            assert not pid_alive(pid)
        assert "supervisor received SIGTERM" in log_path.read_text()
    finally:
        stop_process(process)


async def test_killed_worker_restarts(
    tmp_path: Path,
    group_config: tuple[Path, int, int],
    client: aiohttp.ClientSession,
    redis_client: redis.asyncio.Redis,
) -> None:
    config_path, port, admin_port = group_config
    log_path = tmp_path / "supervisor.log"
    command = [sys.executable, "-m", "proxy", "run", "--config", str(config_path)]
    process = spawn(command, log_path)
    try:
        workers = await wait_for_workers(client, admin_port, process, log_path)
        victim = next(body["pid"] for body in workers if body["worker"] == 1)
        os.kill(victim, signal.SIGKILL)

        workers = await wait_for_workers(
            client, admin_port, process, log_path, exclude_pids={victim}
        )
        restarted = next(body for body in workers if body["worker"] == 1)
        assert restarted["pid"] != victim
        log = log_path.read_text()
        assert f"worker 1 (pid {victim}) exited unexpectedly with signal SIGKILL" in log

        reply = await request_json(
            client, f"http://{LOOPBACK}:{port}", routing_headers("after-restart")
        )
        assert reply.status == 200, reply.body
        assert stop_process(process, signal.SIGINT) == 0, log_tail(log_path)
    finally:
        stop_process(process)


# A stand-in worker with the default SIGTERM action, as a real worker has
# after its proxy stopped and removed its handlers.
STAND_IN_WORKER = (
    "import pathlib, sys, time\n"
    "pathlib.Path(sys.argv[1], 'ready-' + sys.argv[-1]).touch()\n"
    "time.sleep(60)\n"
)
RUN_SUPERVISOR = (
    "import sys\n"
    "from proxy.supervisor import Supervisor\n"
    "sys.exit(Supervisor(sys.argv[1:], 2, 1.0).run())\n"
)


def test_worker_ended_by_forwarded_stop_is_clean(tmp_path: Path) -> None:
    # A worker stopped by a SIGTERM sent to the whole process group (systemd,
    # kill -TERM -PGID) can finish before the supervisor's copy arrives.
    worker = [sys.executable, "-c", STAND_IN_WORKER, str(tmp_path)]
    log_path = tmp_path / "supervisor.log"
    process = spawn([sys.executable, "-c", RUN_SUPERVISOR, *worker], log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(list(tmp_path.glob("ready-*"))) < WORKERS:
            assert process.poll() is None, log_tail(log_path)
            assert time.monotonic() < deadline, "stand-in workers did not start"
            time.sleep(0.02)

        code = stop_process(process, signal.SIGTERM)

        assert code == 0, log_tail(log_path)
    finally:
        stop_process(process)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_memory_store_with_workers_rejected(
    tmp_path: Path, pods: list[PodProcess]
) -> None:
    document = proxy_document(pods, "redis://127.0.0.1:1/0")
    document["store"] = {"backend": "memory"}
    document["proxy"]["port"] = free_port()
    config_path = write_config(tmp_path, document, "memory.toml")

    result = run_cli("run", "--config", str(config_path), "--workers", "2")

    assert result.returncode == 2
    assert 'proxy.workers = 2: needs store.backend = "redis"' in result.stderr


def test_workers_option_out_of_range(tmp_path: Path, pods: list[PodProcess]) -> None:
    document = proxy_document(pods, "redis://127.0.0.1:1/0")
    config_path = write_config(tmp_path, document, "range.toml")

    result = run_cli("run", "--config", str(config_path), "--workers", "0")

    assert result.returncode == 2
    assert "proxy.workers" in result.stderr


async def test_sighup_reloads_every_worker(
    tmp_path: Path,
    pods: list[PodProcess],
    redis_server: RedisServer,
    group_config: tuple[Path, int, int],
    client: aiohttp.ClientSession,
) -> None:
    config_path, port, admin_port = group_config
    log_path = tmp_path / "supervisor.log"
    command = [sys.executable, "-m", "proxy", "run", "--config", str(config_path)]
    process = spawn(command, log_path)
    try:
        workers = await wait_for_workers(client, admin_port, process, log_path)
        pids = {body["pid"] for body in workers}
        document = proxy_document(pods, redis_server.url)
        document["proxy"]["port"] = port
        document["proxy"]["workers"] = WORKERS
        document["admin"]["port"] = admin_port
        document["services"]["game"]["strategy"] = "least_connections"
        write_config(tmp_path, document, "workers.toml")

        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if log_path.read_text().count("on SIGHUP: ") >= WORKERS:
                break
            await asyncio.sleep(0.05)
        reloads = log_path.read_text().count("on SIGHUP: ")
        workers = await wait_for_workers(client, admin_port, process, log_path)
        reply = await request_json(
            client, f"http://{LOOPBACK}:{port}", routing_headers("after-reload")
        )
    finally:
        stop_process(process)

    assert reloads == WORKERS, log_tail(log_path)
    assert {body["pid"] for body in workers} == pids
    assert reply.status == 200
