"""Memory of one proxy process holding many idle keep-alive client connections.

Starts one pod (``benchmarks/pod.py``) and ``stateful-route run`` on
loopback, with the memory store or, with ``--store redis``, the Redis store
of a redis-server that the script starts on a free loopback port (Redis
persistence off). It sends a request on each of ``--connections``
new keep-alive connections (10,000 by default) and leaves them open and
idle. Then it reports the proxy's resident memory (VmRSS of
``/proc/<pid>/status``) before, `SETTLE_S` after, and ``--late-s`` seconds
after the last connection opened, and per connection. The memory after the
burst is also split into the anonymous part and the mapped files, which
the workers of one machine share. The late measurement
comes after the proxy closed the store and pod connections that the burst
left idle (``store.redis_idle_timeout_s`` and
``proxy.upstream_idle_timeout_s``, 30 s by default) and forgot the recent
invalidations of the Redis store. The idle connections stay open for both,
within the proxy's keep-alive timeout (``proxy.keepalive_timeout_s``, 75 s
by default).

Each connection is a new user, so ``--open-concurrency`` (200 by default)
also sets how many store and pod connections the proxy opens at the peak,
and keeps open after it. The proxy's modules are compiled first, as an
installed package has them, because a machine that sets
PYTHONDONTWRITEBYTECODE would otherwise compile them at every start.

It raises its own RLIMIT_NOFILE, which the proxy inherits, to the
connections plus `FD_HEADROOM`, bounded by the hard limit.

    python benchmarks/idle_connections.py --connections 10000
    python benchmarks/idle_connections.py --connections 10000 --store redis
    python benchmarks/idle_connections.py --store redis --open-concurrency 20
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
FD_HEADROOM = 512
MAX_CONNECTIONS = 30_000
MAX_OPEN_CONCURRENCY = 1_000
READY_TIMEOUT_S = 20.0
SETTLE_S = 3.0
# The proxy closes idle keep-alive connections after 75 s by default, so
# the late measurement must come well before.
MAX_LATE_S = 60.0
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nX-Uid: idle-%d\r\n\r\n"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Return a resident memory field of `pid`'s /proc status in MiB.

    VmRSS is the sum of RssAnon (the process's own heap and stacks) and
    RssFile (pages of mapped files: the interpreter, libraries and
    extension modules, which every process mapping the file shares).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def raise_file_limit(connections: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + FD_HEADROOM
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise SystemExit(
            f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors "
            f"needed; use --connections {hard - FD_HEADROOM} or raise the limit"
        )
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def wait_listening(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{name} exited with {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} not listening on {port}") from None
            time.sleep(0.05)


def start_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """Start a redis-server on `port` of loopback, without persistence."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server not found: install the redis-server package")
    command = [executable, "--bind", HOST, "--port", str(port), "--save", ""]
    command += ["--appendonly", "no", "--dir", str(directory)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def write_config(directory: Path, port: int, pod_port: int, redis_url: str) -> Path:
    """Write the proxy's config, with the Redis store when `redis_url` is set."""
    store = 'backend = "memory"'
    if redis_url:
        store = f'backend = "redis"\nredis_url = "{redis_url}"'
    path = directory / "proxy.toml"
    path.write_text(
        f"""[proxy]
host = "{HOST}"
port = {port}
default_service = "bench"

[admin]
enabled = false

[store]
{store}

[log]
level = "warning"

[services.bench]
pods = ["{HOST}:{pod_port}"]
"""
    )
    return path


async def open_idle(
    port: int, count: int, concurrency: int
) -> list[asyncio.StreamWriter]:
    """Open `count` connections and send one request on each, read to the end.

    At most `concurrency` connections wait for their response at a time.
    """
    writers: list[asyncio.StreamWriter] = []
    limit = asyncio.Semaphore(concurrency)

    async def one(number: int) -> None:
        async with limit:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(REQUEST % number)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response {head[:40]!r}")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            writers.append(writer)

    await asyncio.gather(*(one(number) for number in range(count)))
    return writers


async def measure(
    proxy_pid: int, port: int, count: int, concurrency: int, late_s: float
) -> tuple[float, float, tuple[float, float], float | None]:
    """Return the RSS before, `SETTLE_S` after and `late_s` after the burst.

    The third item splits the RSS after the burst into RssAnon and RssFile.
    The last is None when `late_s` is 0.
    """
    # A few requests first, so the before value includes the warm paths.
    for writer in await open_idle(port, 10, concurrency):
        writer.close()
    await asyncio.sleep(SETTLE_S)
    before = rss_mb(proxy_pid)
    writers = await open_idle(port, count, concurrency)
    opened_at = time.monotonic()
    await asyncio.sleep(SETTLE_S)
    after = rss_mb(proxy_pid)
    after_kinds = (rss_mb(proxy_pid, "RssAnon"), rss_mb(proxy_pid, "RssFile"))
    late = None
    if late_s > 0:
        await asyncio.sleep(max(0.0, opened_at + late_s - time.monotonic()))
        late = rss_mb(proxy_pid)
    for writer in writers:
        writer.close()
    return before, after, after_kinds, late


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--connections",
        type=int,
        default=10_000,
        help=f"idle connections to open, 1 to {MAX_CONNECTIONS} (default: %(default)s)",
    )
    parser.add_argument(
        "--store",
        choices=("memory", "redis"),
        default="memory",
        help="link store of the proxy; redis starts its own redis-server "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--open-concurrency",
        type=int,
        default=200,
        help="connections that wait for their first response at a time, "
        f"1 to {MAX_OPEN_CONCURRENCY}; each is a new user, so this is also "
        "the peak of the proxy's store and pod connections (default: %(default)s)",
    )
    parser.add_argument(
        "--late-s",
        type=float,
        default=35.0,
        help="time of the late measurement, in seconds after the last connection "
        "opened, "
        f"{SETTLE_S:g} to {MAX_LATE_S:g}, or 0 to skip it (default: %(default)s)",
    )
    arguments = parser.parse_args()
    late_s = arguments.late_s
    if late_s != 0 and not SETTLE_S <= late_s <= MAX_LATE_S:
        parser.error(
            f"--late-s {late_s:g}: expected 0 or {SETTLE_S:g} to {MAX_LATE_S:g}"
        )
    count = arguments.connections
    concurrency = arguments.open_concurrency
    if not 1 <= concurrency <= MAX_OPEN_CONCURRENCY:
        parser.error(
            f"--open-concurrency {concurrency}: expected 1 to {MAX_OPEN_CONCURRENCY}"
        )
    if not 1 <= count <= MAX_CONNECTIONS:
        parser.error(f"--connections {count}: expected 1 to {MAX_CONNECTIONS}")
    raise_file_limit(count)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "proxy")], check=True
    )

    started: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="stateful-route-idle-") as name:
        directory = Path(name)
        try:
            pod_port, port = free_port(), free_port()
            pod_command = [sys.executable, str(ROOT / "benchmarks" / "pod.py")]
            pod = subprocess.Popen(
                [*pod_command, "--index", "0", "--port", str(pod_port)],
                stdout=subprocess.DEVNULL,
            )
            started.append(pod)
            wait_listening(pod_port, pod, "pod")
            redis_url = ""
            if arguments.store == "redis":
                redis_port = free_port()
                redis = start_redis(directory, redis_port)
                started.append(redis)
                wait_listening(redis_port, redis, "redis-server")
                redis_url = f"redis://{HOST}:{redis_port}/0"
            config = write_config(directory, port, pod_port, redis_url)
            proxy = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                cwd=ROOT,
            )
            started.append(proxy)
            wait_listening(port, proxy, "proxy")
            before, after, (anonymous, mapped), late = asyncio.run(
                measure(proxy.pid, port, count, concurrency, late_s)
            )
        finally:
            # The proxy stops before its store, so it does not log an outage.
            for process in reversed(started):
                process.terminate()
                process.wait(10)

    per_connection_kb = (after - before) * 1024 / count
    print(
        f"idle keep-alive connections: {count:,} ({arguments.store} store, "
        f"opened {concurrency} at a time)"
    )
    print(f"proxy RSS before: {before:.1f} MiB")
    print(f"proxy RSS after:  {after:.1f} MiB ({SETTLE_S:g} s after the burst)")
    print(f"  of which:       {anonymous:.1f} MiB anonymous, {mapped:.1f} MiB files")
    print(f"per connection:   {per_connection_kb:.1f} KiB")
    if late is not None:
        late_kb = (late - before) * 1024 / count
        print(f"proxy RSS late:   {late:.1f} MiB ({late_s:g} s after the burst)")
        print(f"per connection:   {late_kb:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
