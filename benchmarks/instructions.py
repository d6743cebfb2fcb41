"""Count the instructions per request of the forwarding path under callgrind.

Starts four nginx pods that respond with 9-byte bodies, a redis-server
(persistence off) and this proxy with the Redis store under ``valgrind
--tool=callgrind``, all on free 127.0.0.1 ports. A client on
``--connections`` keep-alive connections first sends one GET for each of
``--uids`` UIDs, so the proxy links them and keeps them in its local cache.
Then the script zeroes the counters with ``callgrind_control -z``, sends
``--requests`` GETs with random UIDs of those (from a fixed seed), writes
the counts with ``callgrind_control -d`` and prints the instructions (Ir)
per request. The client is Python's http.client, which also sends Host and
``Accept-Encoding: identity``.

Callgrind counts the proxy's user-space instructions only, so the system
calls of socket reads and writes are not in the number. The count also
contains the background work of the measured interval, such as the health
probes of the four pods.

With ``--annotate`` it also prints the top functions by inclusive and by
self cost, from ``callgrind_annotate``. Callgrind records C functions only, so
Python code shows up as the interpreter's functions, such as
``_PyEval_EvalFrameDefault``. Every process it started is
stopped at the end, also on an error, SIGTERM or Ctrl+C.

Run it with the Python of the project's virtual environment::

    .venv/bin/python benchmarks/instructions.py
    .venv/bin/python benchmarks/instructions.py --annotate
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
POD_COUNT = 4
POD_BODY_SIZE = 9
SEED = 20_260_101
# Python runs many times slower under callgrind, so the waits are long,
# but each one is bounded.
READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 1800.0
TOOL_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
_SUMMARY_RE = re.compile(r"^(?:summary|totals):\s+(\d+)", re.M)
_SHARE_RE = re.compile(r"\(\s*([\d.]+)%\)")
_RECURSION_RE = re.compile(r"'\d+(?: |$)")


class Processes:
    """The processes this run started. `stop_all` ends each one by its pid."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=self.directory,
            )
        self._started.append((name, process))
        return process

    def stop_all(self) -> None:
        for _, process in self._started:
            if process.poll() is None:
                process.terminate()
        for name, process in self._started:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"{name} (pid {process.pid}) did not stop, killing it")
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        self._started.clear()

    def log_tail(self, name: str) -> str:
        path = self.directory / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return path.read_text(errors="replace")[-2000:]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(
    port: int, processes: Processes, name: str, process: subprocess.Popen[bytes]
) -> None:
    """Wait until ``GET /`` on `port` returns 200, or raise."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {process.returncode}: {processes.log_tail(name)}"
            )
        try:
            if get(port, "/", "ready-check") == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{name} not ready on port {port} within {READY_TIMEOUT_S:g} s: "
                f"{processes.log_tail(name)}"
            )
        time.sleep(0.2)


def wait_port(port: int, name: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not listening on port {port}")
        time.sleep(0.05)


def get(port: int, path: str, uid: str) -> int:
    """Send one GET on a new connection and return its status."""
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("GET", path, headers={"X-Uid": uid})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def pod_config(directory: Path, index: int, port: int) -> Path:
    body = f"pod {index} ok\n"
    assert len(body) == POD_BODY_SIZE
    path = directory / f"pod-{index}.conf"
    path.write_text(
        f"""worker_processes 1;
daemon off;
pid {directory}/pod-{index}.pid;
error_log {directory}/pod-{index}.error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {directory}/pod-{index}-body;
    keepalive_requests 1000000;
    server {{
        listen {HOST}:{port};
        location / {{ return 200 "{body}"; }}
    }}
}}
"""
    )
    return path


def proxy_config(
    directory: Path, port: int, admin_port: int, redis_port: int, pods: list[int]
) -> Path:
    """Write the configuration of `benchmarks/run`, with one worker."""
    addresses = ", ".join(f'"{HOST}:{pod}"' for pod in pods)
    path = directory / "stateful-route.toml"
    path.write_text(
        f"""[proxy]
host = "{HOST}"
port = {port}
default_service = "bench"
workers = 1

[admin]
host = "{HOST}"
port = {admin_port}

[store]
backend = "redis"
redis_url = "redis://{HOST}:{redis_port}/0"

[log]
level = "warning"

[services.bench]
pods = [{addresses}]
health_check_path = "/"
"""
    )
    return path


def start_all(
    processes: Processes, directory: Path
) -> tuple[int, subprocess.Popen[bytes], Path]:
    """Start the pods, Redis and the proxy under callgrind.

    Returns the proxy's port, its process and the prefix of its callgrind
    output files.
    """
    pod_ports = []
    for index in range(POD_COUNT):
        port = free_port()
        config = pod_config(directory, index, port)
        process = processes.start(f"pod-{index}", ["nginx", "-c", str(config)])
        wait_ready(port, processes, f"pod-{index}", process)
        pod_ports.append(port)

    redis_port = free_port()
    redis = processes.start(
        "redis",
        [
            "redis-server", "--bind", HOST, "--port", str(redis_port), "--save", "",
            "--appendonly", "no", "--dir", str(directory),
        ],
    )  # fmt: skip
    wait_port(redis_port, "redis", redis)

    port = free_port()
    config = proxy_config(directory, port, free_port(), redis_port, pod_ports)
    output = directory / "callgrind.out"
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={output}.%p",
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(config),
    ]
    proxy = processes.start("stateful-route", command)
    wait_ready(port, processes, "stateful-route", proxy)
    return port, proxy, output


def send_all(
    port: int, uids: list[str], connections: int, deadline: float
) -> list[str]:
    """Send a GET for each UID over keep-alive connections in parallel.

    Returns one line per failed request, empty when every request got 200.
    """
    failures: list[str] = []
    lock = threading.Lock()

    def run(share: list[str]) -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
        try:
            for uid in share:
                if time.monotonic() > deadline:
                    raise TimeoutError("the run's deadline passed")
                connection.request("GET", "/", headers={"X-Uid": uid})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    with lock:
                        failures.append(f"{uid}: status {response.status}")
        except (OSError, http.client.HTTPException) as error:
            with lock:
                failures.append(f"connection failed: {error!r}")
        finally:
            connection.close()

    threads = [
        threading.Thread(target=run, args=(uids[i::connections],), daemon=True)
        for i in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise TimeoutError("a client connection passed the run's deadline")
    return failures


def callgrind_control(option: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", option, str(pid)],
        check=True,
        capture_output=True,
        timeout=TOOL_TIMEOUT_S,
    )


def dumped_file(output: Path, pid: int) -> Path:
    """Return the file that ``callgrind_control -d`` wrote for `pid`."""
    deadline = time.monotonic() + TOOL_TIMEOUT_S
    while True:
        dumps = sorted(output.parent.glob(f"{output.name}.{pid}.*"))
        if dumps and _SUMMARY_RE.search(dumps[-1].read_text(errors="replace")):
            return dumps[-1]
        if time.monotonic() > deadline:
            raise RuntimeError(f"no callgrind dump for pid {pid} in {output.parent}")
        time.sleep(0.2)


def total_instructions(dump: Path) -> int:
    match = _SUMMARY_RE.search(dump.read_text(errors="replace"))
    if match is None:
        raise RuntimeError(f"no summary line in {dump}")
    return int(match[1])


def annotate(dump: Path, top: int) -> None:
    for inclusive in ("yes", "no"):
        result = subprocess.run(
            [
                "callgrind_annotate",
                f"--inclusive={inclusive}",
                "--threshold=100",
                "--auto=no",
                str(dump),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
        )
        kind = "inclusive" if inclusive == "yes" else "self"
        print(f"\nTop {top} functions by {kind} cost:")
        lines = result.stdout.splitlines()
        start = next(
            (i for i, line in enumerate(lines) if "file:function" in line), None
        )
        if start is None:
            print(result.stdout)
            continue
        printed = 0
        for line in lines[start + 2 :]:
            share = _SHARE_RE.search(line)
            if share is None or printed == top:
                break
            # The functions on the stack at the dump, such as main, show
            # about the whole total, even as self cost. An inclusive row of
            # a recursive call (a name ending in 'N) counts a cost once per
            # level.
            if float(share[1]) >= 99:
                continue
            if kind == "inclusive" and _RECURSION_RE.search(line):
                continue
            print(line)
            printed += 1


def measure(args: argparse.Namespace, directory: Path, processes: Processes) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    port, proxy, output = start_all(processes, directory)

    uids = [f"user-{i}" for i in range(1, args.uids + 1)]
    failures = send_all(port, uids, args.connections, deadline)
    if failures:
        raise RuntimeError(f"linking the UIDs failed: {failures[:5]}")

    draw = random.Random(SEED)
    requests = [draw.choice(uids) for _ in range(args.requests)]
    callgrind_control("-z", proxy.pid)
    failures = send_all(port, requests, args.connections, deadline)
    callgrind_control("-d", proxy.pid)
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[:5]}")

    dump = dumped_file(output, proxy.pid)
    instructions = total_instructions(dump)
    print(
        f"{instructions:,} instructions for {args.requests:,} requests: "
        f"{instructions / args.requests:,.0f} per request"
    )
    if args.annotate:
        annotate(dump, args.top)
    if args.keep is not None:
        shutil.copy(dump, args.keep)
        print(f"callgrind output copied to {args.keep}")


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="measured requests (default 2000)"
    )
    parser.add_argument(
        "--uids",
        type=int,
        default=500,
        help="UIDs linked before the measured requests (default 500)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=20,
        help="keep-alive client connections (default 20)",
    )
    parser.add_argument(
        "--annotate",
        action="store_true",
        help="also print the top functions by inclusive and self cost",
    )
    parser.add_argument(
        "--top", type=int, default=40, help="functions printed by --annotate"
    )
    parser.add_argument(
        "--keep", type=Path, help="copy the callgrind output file to this path"
    )
    args = parser.parse_args()
    for name in ("requests", "uids", "connections", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    missing = [
        tool
        for tool in ("valgrind", "callgrind_control", "nginx", "redis-server")
        if shutil.which(tool) is None
    ]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, raise_interrupt)
    with tempfile.TemporaryDirectory(prefix="instructions-") as name:
        processes = Processes(Path(name))
        try:
            measure(args, Path(name), processes)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            processes.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
