"""Detection run: how long the default health checks take to see a failed pod.

Starts three pods (benchmarks/pod.py) and the proxy (``stateful-route run``)
on loopback with the memory store and ``health_check_path = "/"``, every
other health setting at its default. Each run then breaks pod 1 and polls the
admin API every 20 ms until the pod is unusable, and again after repairing
it until it is usable. Modes:

- ``killed``: SIGKILL, so probes are refused; the pod is started again.
- ``stopped``: SIGSTOP, so probes time out; SIGCONT repairs it.
- ``traffic``: SIGKILL while 10 users of the pod send a request every
  20 ms in turn, so the passive detection of failed requests also runs.
  Each user moves to another pod after its first failed request, when the
  request is sent again there, so it takes 5 users to eject the pod.

It prints one line per run and the minimum, median and maximum per mode.

    python benchmarks/detection.py --runs 3 --modes killed stopped traffic
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
POLL_S = 0.02
# Bound of every wait. A pod ejected by passive detection is usable again
# only after its ejection, at most max_ejection_s (300 s by default).
WAIT_S = 330.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(POLL_S)
    raise SystemExit(f"nothing listens on {HOST}:{port}")


def start_pod(index: int, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(ROOT / "benchmarks" / "pod.py")]
    process = subprocess.Popen(
        [*command, "--index", str(index), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(port)
    return process


def get_json(url: str, headers: dict[str, str] | None = None) -> object:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def pod_usable(admin: str, index: int) -> bool:
    body = get_json(f"http://{admin}/v1/services/game/health")
    assert isinstance(body, dict)
    [pod] = [pod for pod in body["pods"] if pod["index"] == index]
    return bool(pod["usable"])


def wait_usable(admin: str, index: int, usable: bool) -> float:
    """Poll until pod `index` is `usable`; return the seconds it took."""
    started = time.monotonic()
    while pod_usable(admin, index) is not usable:
        if time.monotonic() - started > WAIT_S:
            raise SystemExit(f"pod {index} not usable={usable} within {WAIT_S} s")
        time.sleep(POLL_S)
    return time.monotonic() - started


class Traffic:
    """Users sending a request every 20 ms in turn, in a thread, until `stop`."""

    def __init__(self, proxy: str, uids: list[str]) -> None:
        self._url = f"http://{proxy}/"
        self._uids = uids
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        turn = 0
        while not self._stopping.wait(POLL_S):
            headers = {"X-Uid": self._uids[turn % len(self._uids)], "X-Service": "game"}
            turn += 1
            request = urllib.request.Request(self._url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    response.read()
            except (urllib.error.URLError, OSError):
                pass

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(WAIT_S)


def users_on_pod(proxy: str, index: int, prefix: str, count: int) -> list[str]:
    """Return `count` new UIDs that the proxy links to pod `index`."""
    found: list[str] = []
    for number in range(5000):
        uid = f"{prefix}-{number}"
        headers = {"X-Uid": uid, "X-Service": "game"}
        request = urllib.request.Request(f"http://{proxy}/", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            if response.headers["X-Routed-Pod"] == str(index):
                found.append(uid)
        if len(found) == count:
            return found
    raise SystemExit(f"fewer than {count} new users reached pod {index}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per mode")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["killed", "stopped", "traffic"],
        choices=["killed", "stopped", "traffic"],
    )
    args = parser.parse_args()

    ports = [free_port() for _ in range(3)]
    pods = [start_pod(index, port) for index, port in enumerate(ports)]
    proxy_port, admin_port = free_port(), free_port()
    config = f"""
[proxy]
host = "{HOST}"
port = {proxy_port}
[admin]
host = "{HOST}"
port = {admin_port}
[log]
level = "warning"
[services.game]
pods = [{", ".join(f'"{HOST}:{port}"' for port in ports)}]
health_check_path = "/"
"""
    with tempfile.TemporaryDirectory() as directory:
        config_path = Path(directory) / "config.toml"
        config_path.write_text(config)
        proxy = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config_path)],
            cwd=ROOT,
        )
        try:
            wait_listening(admin_port)
            run_modes(args, pods, ports, f"{HOST}:{proxy_port}", f"{HOST}:{admin_port}")
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(WAIT_S)
            for pod in pods:
                pod.send_signal(signal.SIGCONT)
                pod.kill()
                pod.wait(WAIT_S)


def run_modes(
    args: argparse.Namespace,
    pods: list[subprocess.Popen[bytes]],
    ports: list[int],
    proxy: str,
    admin: str,
) -> None:
    results: dict[str, list[float]] = {}
    for mode in args.modes:
        for run in range(args.runs):
            traffic = None
            if mode == "traffic":
                traffic = Traffic(proxy, users_on_pod(proxy, 1, f"run-{run}", 10))
                traffic.start()
                time.sleep(0.2)
            started = time.monotonic()
            if mode == "stopped":
                pods[1].send_signal(signal.SIGSTOP)
            else:
                pods[1].kill()
                pods[1].wait(WAIT_S)
            wait_usable(admin, 1, False)
            detected = time.monotonic() - started
            if traffic is not None:
                traffic.stop()

            if mode == "stopped":
                pods[1].send_signal(signal.SIGCONT)
            else:
                pods[1] = start_pod(1, ports[1])
            recovered = wait_usable(admin, 1, True)
            results.setdefault(mode, []).append(detected)
            print(
                f"{mode} run {run + 1}: unusable after {detected:.2f} s, "
                f"usable again {recovered:.2f} s after the repair",
                flush=True,
            )
    for mode, times in results.items():
        print(
            f"{mode}: min {min(times):.2f} s, median {statistics.median(times):.2f} s, "
            f"max {max(times):.2f} s over {len(times)} runs"
        )


if __name__ == "__main__":
    main()
