"""Load run of the sticky path: wrk through the proxy with the Redis store.

Starts a private redis-server, three pods (benchmarks/pod.py) and the proxy
(``stateful-route run``) on loopback, drives wrk with one ``X-Uid`` per
request drawn from a set of UIDs, then checks that no UID reached two pods
and that each UID's pod is the one linked in Redis. Needs ``wrk`` and
``redis-server`` (``apt-get install wrk redis-server``).

    python benchmarks/sticky_load.py --duration 60 --connections 50
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

WRK_SCRIPT = """
local uids = {}
for i = 1, %(uids)d do uids[i] = "user-" .. i end
math.randomseed(%(seed)d)
request = function()
  return wrk.format("GET", "/", {["X-Uid"] = uids[math.random(#uids)]})
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout_s}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=60, help="seconds of load")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--uids", type=int, default=10_000)
    parser.add_argument("--pods", type=int, default=3)
    args = parser.parse_args()
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: install it with apt-get install {tool}")
            return 2

    processes: list[subprocess.Popen[bytes]] = []
    workdir = Path(tempfile.mkdtemp(prefix="sticky-load-"))
    try:
        redis_port = free_port()
        processes.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--bind",
                    HOST,
                    "--port",
                    str(redis_port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        pod_ports = [free_port() for _ in range(args.pods)]
        for index, port in enumerate(pod_ports):
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "benchmarks" / "pod.py"),
                        "--index",
                        str(index),
                        "--port",
                        str(port),
                    ]
                )
            )
        proxy_port, admin_port = free_port(), free_port()
        pods = ", ".join(f'"{HOST}:{port}"' for port in pod_ports)
        config = workdir / "config.toml"
        config.write_text(
            f'[proxy]\nport = {proxy_port}\ndefault_service = "game"\n'
            f"[admin]\nport = {admin_port}\n"
            f'[store]\nbackend = "redis"\nredis_url = "redis://{HOST}:{redis_port}/0"\n'
            f'[log]\nlevel = "warning"\n'
            f"[services.game]\npods = [{pods}]\n"
        )
        for port in [redis_port, *pod_ports]:
            wait_for_port(port)
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                cwd=ROOT,
            )
        )
        wait_for_port(proxy_port)

        script = workdir / "uids.lua"
        script.write_text(WRK_SCRIPT % {"uids": args.uids, "seed": 42})
        result = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{args.connections}",
                f"-d{args.duration}s",
                "--latency",
                "-s",
                str(script),
                f"http://{HOST}:{proxy_port}/",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        print(result.stdout)
        return verify(result.stdout, pod_ports, redis_port)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def verify(wrk_output: str, pod_ports: list[int], redis_port: int) -> int:
    """Print the checks of one run; return 0 when all passed."""
    total = int(re.search(r"(\d+) requests in", wrk_output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk_output)
    socket_errors = re.search(r"Socket errors: (.*)", wrk_output)
    errors = int(non_2xx.group(1)) if non_2xx else 0

    pod_of: dict[str, int] = {}
    split = 0
    for index, port in enumerate(pod_ports):
        with urllib.request.urlopen(f"http://{HOST}:{port}/__uids") as response:
            for uid in orjson.loads(response.read()):
                if uid in pod_of:
                    split += 1
                pod_of[uid] = index

    client = redis.Redis(host=HOST, port=redis_port, decode_responses=True)
    keys = [f"sf:{{default:lk:{uid}}}game" for uid in pod_of]
    linked = client.mget(keys) if keys else []
    client.close()
    mismatched = sum(
        1
        for uid, link in zip(pod_of, linked, strict=True)
        if link is None or int(link) != pod_of[uid]
    )

    print(f"requests: {total}")
    print(f"non-2xx responses: {errors}")
    print(f"socket errors: {socket_errors.group(1) if socket_errors else 'none'}")
    print(f"UIDs seen: {len(pod_of)}")
    print(f"UIDs that reached more than one pod: {split}")
    print(f"UIDs whose pod differs from their link in Redis: {mismatched}")
    ok = errors == 0 and socket_errors is None and split == 0 and mismatched == 0
    print("result: " + ("every UID stayed on one pod, no errors" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
