"""The supervisor of ``stateful-route run`` with ``proxy.workers`` > 1.

The supervisor starts one ``stateful-route run --worker I`` process per
worker. Every worker binds ``proxy.port`` with SO_REUSEPORT, so the kernel
spreads new connections over them, and worker I serves the admin API on
``admin.port + I``, so health checks and metrics are per worker.

SIGTERM, SIGINT and SIGHUP are forwarded to every worker. After SIGTERM or
SIGINT the supervisor waits for the workers and exits with 0 when all of
them exited with 0 or were ended by that signal, else with 1. A worker that
dies while no stop was asked for is started again after a backoff that
doubles from `RESTART_MIN_S` to `RESTART_MAX_S` and resets once the worker
ran for `STABLE_S`. A worker that exits with the configuration error code
stops the whole group, as does one that fails `MAX_QUICK_FAILURES` times in
a row within `STABLE_S` of its start. Each worker reloads its configuration
on the forwarded SIGHUP.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

logger = logging.getLogger("stateful_route.supervisor")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 30.0
MAX_QUICK_FAILURES = 5
# Seconds the workers get to stop after the forwarded signal before they
# are killed; beyond proxy.shutdown_timeout_s to let them drain first.
KILL_GRACE_S = 5.0
_POLL_S = 0.05
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_STOPPING = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to the worker when the supervisor dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: a killed supervisor leaves its workers running


class Supervisor:
    """Starts, watches and stops the worker processes.

    :param command: the worker command without ``--worker I``.
    :param workers: number of workers.
    :param shutdown_timeout_s: ``proxy.shutdown_timeout_s`` of the workers.
    """

    def __init__(
        self, command: Sequence[str], workers: int, shutdown_timeout_s: float
    ) -> None:
        self._command = list(command)
        self._workers = [_Worker(index) for index in range(workers)]
        self._kill_after_s = shutdown_timeout_s + KILL_GRACE_S
        self._stop_signal: int | None = None
        self._stop_at = 0.0
        self._pending_signals: list[int] = []
        self._failure_code: int | None = None

    def run(self) -> int:
        """Run the workers until a stop signal or a fatal failure; return the code."""
        previous = {number: signal.getsignal(number) for number in _FORWARDED}
        for number in _FORWARDED:
            signal.signal(number, self._on_signal)
        try:
            for worker in self._workers:
                self._start(worker)
            logger.info(
                "supervisor pid %d started %d workers", os.getpid(), len(self._workers)
            )
            while self._step():
                time.sleep(_POLL_S)
        finally:
            self._kill_all()
            for number, handler in previous.items():
                signal.signal(number, handler)
        return self._exit_code()

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        self._pending_signals.append(number)

    def _step(self) -> bool:
        """Forward signals and handle exits once; return whether to go on."""
        while self._pending_signals:
            self._forward(self._pending_signals.pop(0))
        now = time.monotonic()
        for worker in self._workers:
            self._check(worker, now)
        if self._stop_signal is None:
            return True
        if now > self._stop_at:
            self._kill_all()
        return any(worker.process is not None for worker in self._workers)

    def _forward(self, number: int) -> None:
        name = signal.Signals(number).name
        if number in _STOPPING and self._stop_signal is None:
            logger.info("supervisor received %s, stopping the workers", name)
            self._begin_stop(number)
            return
        logger.info("supervisor received %s, forwarding it to the workers", name)
        self._signal_all(number)

    def _begin_stop(self, number: int) -> None:
        self._stop_signal = number
        self._stop_at = time.monotonic() + self._kill_after_s
        for worker in self._workers:
            worker.restart_at = None
        self._signal_all(number)

    def _signal_all(self, number: int) -> None:
        for worker in self._workers:
            process = worker.process
            if process is not None and process.poll() is None:
                process.send_signal(number)

    def _check(self, worker: _Worker, now: float) -> None:
        process = worker.process
        if process is None:
            if worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker)
            return
        code = process.poll()
        if code is None:
            return
        worker.process = None
        if self._stop_signal is None:
            worker.exit_codes.append(code)
            self._restart_later(worker, process.pid, code, now)
            return
        logger.info(
            "worker %d (pid %d) exited with %d", worker.index, process.pid, code
        )
        # A worker that also got the stop signal itself (one sent to the whole
        # process group) may have stopped and removed its handlers before the
        # forwarded copy arrived, which then ends it: a clean stop all the same.
        worker.exit_codes.append(0 if code == -self._stop_signal else code)

    def _restart_later(self, worker: _Worker, pid: int, code: int, now: float) -> None:
        from proxy.cli import EXIT_CONFIG, EXIT_FAILURE

        if now - worker.started_at < STABLE_S:
            worker.quick_failures += 1
        else:
            worker.quick_failures = 1
        if code == EXIT_CONFIG or worker.quick_failures >= MAX_QUICK_FAILURES:
            logger.error(
                "worker %d (pid %d) exited with %d, %d times within %gs of its "
                "start; stopping all workers",
                worker.index,
                pid,
                code,
                worker.quick_failures,
                STABLE_S,
            )
            self._failure_code = EXIT_CONFIG if code == EXIT_CONFIG else EXIT_FAILURE
            self._begin_stop(signal.SIGTERM)
            return
        delay_s = min(RESTART_MAX_S, RESTART_MIN_S * 2 ** (worker.quick_failures - 1))
        worker.restart_at = now + delay_s
        logger.warning(
            "worker %d (pid %d) exited unexpectedly with %s; restarting it in %gs",
            worker.index,
            pid,
            _describe_exit(code),
            delay_s,
        )

    def _start(self, worker: _Worker) -> None:
        worker.restart_at = None
        worker.started_at = time.monotonic()
        command = [*self._command, "--worker", str(worker.index)]
        worker.process = subprocess.Popen(command, preexec_fn=_die_with_parent)
        logger.info("worker %d started, pid %d", worker.index, worker.process.pid)

    def _kill_all(self) -> None:
        for worker in self._workers:
            process = worker.process
            if process is None:
                continue
            if process.poll() is None:
                logger.warning(
                    "worker %d (pid %d) did not stop in time, killing it",
                    worker.index,
                    process.pid,
                )
                process.kill()
            worker.exit_codes.append(process.wait())
            worker.process = None

    def _exit_code(self) -> int:
        if self._failure_code is not None:
            return self._failure_code
        last_codes = [worker.exit_codes[-1:] for worker in self._workers]
        if all(codes == [0] for codes in last_codes):
            return 0
        return 1


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def worker_command(config_path: str, log_level: str | None) -> list[str]:
    """Return the command of one worker, without its ``--worker`` option."""
    command = [sys.executable, "-m", "proxy", "run", "--config", config_path]
    if log_level:
        command += ["--log-level", log_level]
    return command
