"""The ``stateful-route`` command line: run, check and demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import uvloop

from proxy import __version__
from proxy.config import ENV_PREFIX, Config, load_config
from proxy.errors import ConfigError, StoreUnavailableError
from proxy.logs import setup_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

logger = logging.getLogger("stateful_route.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stateful-route",
        allow_abbrev=False,
        description="Sidecar proxy that keeps every user on the pod holding its state.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="run the proxy with a configuration file", allow_abbrev=False
    )
    run.add_argument(
        "--config",
        default="config.toml",
        help="configuration file (default: %(default)s)",
    )
    run.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log level, overriding log.level of the configuration",
    )
    run.add_argument(
        "--workers",
        type=int,
        help="number of proxy processes sharing proxy.port, 1 to 64, overriding "
        "proxy.workers of the configuration",
    )
    # Set by the supervisor on the processes it starts.
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)

    check = commands.add_parser(
        "check", help="validate a configuration file and exit", allow_abbrev=False
    )
    check.add_argument(
        "--config",
        default="config.toml",
        help="configuration file (default: %(default)s)",
    )

    demo = commands.add_parser(
        "demo",
        help="run demo pods and a proxy in front of them, no setup needed",
        allow_abbrev=False,
    )
    demo.add_argument(
        "--host",
        default="127.0.0.1",
        help="proxy listen address (default: %(default)s)",
    )
    demo.add_argument(
        "--port", type=int, default=8080, help="proxy port (default: %(default)s)"
    )
    demo.add_argument(
        "--pods",
        type=int,
        default=3,
        help="number of demo pods, 1 to 64 (default: %(default)s)",
    )
    demo.add_argument(
        "--admin-port",
        type=int,
        default=0,
        help="admin API port on 127.0.0.1; 0 picks a free one (default: %(default)s)",
    )
    return parser


def _report_config_error(exc: ConfigError) -> int:
    source = exc.source or "config"
    for problem in exc.problems:
        print(f"{source}: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def command_check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _report_config_error(exc)
    parts = [f"{len(config.services)} services: {', '.join(config.services) or '-'}"]
    if config.pod is not None:
        pod = config.pod
        parts.append(f"pod {pod.index} of {pod.service} in {pod.namespace}")
    print(f"{path}: valid, {'; '.join(parts)}")
    return EXIT_OK


def command_run(
    path: str,
    log_level: str | None,
    workers: int | None = None,
    worker: int | None = None,
) -> int:
    from proxy.server import RELOAD_SIGNALS, STOP_SIGNALS, serve

    if workers is not None:
        # Through the environment, so the workers inherit it and the value
        # is validated like proxy.workers.
        os.environ[f"{ENV_PREFIX}PROXY_WORKERS"] = str(workers)
    try:
        config: Config = load_config(path)
    except ConfigError as exc:
        setup_logging(log_level or "info")
        return _report_config_error(exc)
    setup_logging(
        log_level or config.log.level, config.log.format, config.log.access_log
    )
    if worker is None and config.proxy.workers > 1:
        from proxy.supervisor import Supervisor, worker_command

        supervisor = Supervisor(
            worker_command(path, log_level),
            config.proxy.workers,
            config.proxy.shutdown_timeout_s,
        )
        return supervisor.run()
    try:
        _run_loop(serve(config, STOP_SIGNALS, RELOAD_SIGNALS, worker or 0))
    except StoreUnavailableError as exc:
        logger.error(
            "cannot start: %s. Check store.redis_url and that Redis runs",
            str(exc).rstrip("."),
        )
        return EXIT_FAILURE
    except OSError as exc:
        logger.error(
            "cannot start: %s. Check that proxy.port, admin.port and pod.port "
            "are free and differ",
            str(exc).rstrip("."),
        )
        return EXIT_FAILURE
    return EXIT_OK


def command_demo(host: str, port: int, pods: int, admin_port: int) -> int:
    from proxy.demo import run_demo

    if not 1 <= pods <= 64:
        print(f"--pods {pods}: expected 1 to 64", file=sys.stderr)
        return EXIT_CONFIG
    for name, value in (("--port", port), ("--admin-port", admin_port)):
        if not 0 <= value <= 65535:
            print(f"{name} {value}: expected 0 to 65535", file=sys.stderr)
            return EXIT_CONFIG
    setup_logging("info")
    try:
        _run_loop(run_demo(host, port, pods, admin_port))
    except OSError as exc:
        logger.error("cannot start the demo: %s", exc)
        return EXIT_FAILURE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return command_check(args.config)
    if args.command == "run":
        return command_run(args.config, args.log_level, args.workers, args.worker)
    return command_demo(args.host, args.port, args.pods, args.admin_port)


def entry_point() -> None:
    """Run `main` as the console script and exit with its status."""
    sys.exit(main())
