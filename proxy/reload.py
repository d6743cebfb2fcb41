"""Live reload: read the configuration file again and apply what changed.

A reload, started by SIGHUP or ``POST /v1/reload``, reads the file that the
process started with, with the environment overrides as they were at start,
and validates it with `load_config`, the code behind ``stateful-route
check``. It then compares the new configuration with the running one:

- Settings in `RESTART_SETTINGS`, the ``[pod]`` section, and a change
  between no services and some, reject the reload, because the process
  would have to open or close ports, clients or pools.
- Everything else applies at once, without an ``await`` in between, so a
  request is routed on either the old configuration or the new one. That
  covers services added or removed, their pods, and every per-service
  setting.

A reload that fails, for an invalid file or a setting that needs a restart,
changes nothing. Reloads run one at a time, and none starts once the
process stops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.config import Config, ServiceSettings, load_config
from proxy.errors import ConfigError, StatefulRouteError
from proxy.failover import FailoverHandler
from proxy.health import TransitionCounts
from proxy.logs import REPEAT_EXEMPT
from proxy.pods import Pod
from proxy.services import Service

if TYPE_CHECKING:
    from proxy.server import ProxyServer

logger = logging.getLogger("stateful_route.reload")

# Settings that a running process keeps until it restarts: they decide the
# listening sockets and their request limits, the store client, the pod
# connection pool, the admin app's middleware and the log handlers, which are
# all built once at start.
# The whole [pod] section needs a restart too.
RESTART_SETTINGS: Mapping[str, tuple[str, ...]] = {
    "proxy": (
        "host",
        "port",
        "workers",
        "namespace_header",
        "uid_header",
        "service_header",
        "routed_pod_header",
        "upstream_connections_per_pod",
        "upstream_idle_timeout_s",
        "max_request_line_bytes",
        "max_header_field_bytes",
        "max_header_bytes",
        "max_header_count",
        "max_body_bytes",
        "header_timeout_s",
        "body_timeout_s",
        "keepalive_timeout_s",
    ),
    "admin": ("enabled", "host", "port", "token"),
    "store": (
        "backend",
        "redis_url",
        "redis_timeout_s",
        "redis_connect_timeout_s",
        "redis_retries",
        "redis_max_connections",
        "redis_idle_timeout_s",
        "redis_min_idle_connections",
        "local_cache_ttl_s",
        "local_cache_size",
    ),
    "log": ("level", "format", "access_log"),
}
# Settings whose values never appear in a message, because they may hold a
# password or a token.
_SECRET_SETTINGS = frozenset({"admin.token", "store.redis_url"})


class ReloadRejected(StatefulRouteError):
    """A reload that changed nothing, with every reason.

    `code` is "invalid_config" (the file fails validation),
    "restart_required" (it changes a setting that needs a restart) or
    "stopping" (the process is stopping).
    """

    def __init__(self, code: str, problems: list[str], source: str) -> None:
        self.code = code
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class ServiceChange:
    """The changes of a reload to one service that stays.

    Pods are written ``index@host:port``. A pod whose index stays but whose
    address changes is both removed and added.
    """

    name: str
    pods_added: tuple[str, ...]
    pods_removed: tuple[str, ...]
    settings: tuple[str, ...]

    def describe(self) -> str:
        parts = []
        if self.pods_added:
            parts.append(f"pods added {' '.join(self.pods_added)}")
        if self.pods_removed:
            parts.append(f"pods removed {' '.join(self.pods_removed)}")
        if self.settings:
            parts.append(f"settings changed {','.join(self.settings)}")
        return f"{self.name}: {', '.join(parts)}"

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "pods_added": list(self.pods_added),
            "pods_removed": list(self.pods_removed),
            "settings": list(self.settings),
        }


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """The difference between the running configuration and a new one.

    `settings` lists the changed keys outside the services, such as
    ``proxy.default_service``.
    """

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[ServiceChange, ...]
    settings: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.settings)

    def describe(self) -> str:
        """Return the changes on one line, for the result log line."""
        if self.empty:
            return "no changes"
        parts = []
        if self.added:
            parts.append(f"services added: {', '.join(self.added)}")
        if self.removed:
            parts.append(f"services removed: {', '.join(self.removed)}")
        parts.extend(change.describe() for change in self.changed)
        if self.settings:
            parts.append(f"settings changed: {', '.join(self.settings)}")
        return "; ".join(parts)

    def as_json(self) -> dict[str, object]:
        return {
            "services_added": list(self.added),
            "services_removed": list(self.removed),
            "services_changed": [change.as_json() for change in self.changed],
            "settings_changed": list(self.settings),
        }


def restart_problems(old: Config, new: Config) -> list[str]:
    """Return one problem per change that a running process cannot apply."""
    problems = []
    for section, keys in RESTART_SETTINGS.items():
        for key in keys:
            before = getattr(getattr(old, section), key)
            after = getattr(getattr(new, section), key)
            if before != after:
                problems.append(_restart_problem(f"{section}.{key}", before, after))

    if old.pod is None and new.pod is not None:
        problems.append("[pod]: added, which needs a restart")
    elif old.pod is not None and new.pod is None:
        problems.append("[pod]: removed, which needs a restart")
    elif old.pod is not None and new.pod is not None:
        for spec in dataclasses.fields(old.pod):
            before = getattr(old.pod, spec.name)
            after = getattr(new.pod, spec.name)
            if before != after:
                problems.append(_restart_problem(f"pod.{spec.name}", before, after))

    if not old.services and new.services:
        problems.append(
            "services: the process started without services and has no proxy "
            "port, so adding services needs a restart"
        )
    elif old.services and not new.services:
        problems.append(
            "services: removing every service needs a restart, which also closes "
            "the proxy port"
        )
    return problems


def _restart_problem(key: str, before: Any, after: Any) -> str:
    if key in _SECRET_SETTINGS:
        return f"{key}: changed, which needs a restart"
    return f"{key}: changed from {before!r} to {after!r}, which needs a restart"


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Return what applying `new` over `old` changes, restart settings aside."""
    added = tuple(name for name in new.services if name not in old.services)
    removed = tuple(name for name in old.services if name not in new.services)
    changed = []
    for name, settings in new.services.items():
        before = old.services.get(name)
        if before is None or before == settings:
            continue
        old_pods = _configured_pods(before)
        new_pods = _configured_pods(settings)
        changed.append(
            ServiceChange(
                name,
                pods_added=_pod_names(new_pods - old_pods),
                pods_removed=_pod_names(old_pods - new_pods),
                settings=_changed_fields(before, settings),
            )
        )

    settings_changed = []
    for section in ("proxy", "admin", "store", "log"):
        old_section = getattr(old, section)
        new_section = getattr(new, section)
        for key in _changed_fields(old_section, new_section):
            if key not in RESTART_SETTINGS[section]:
                settings_changed.append(f"{section}.{key}")
    return ReloadPlan(added, removed, tuple(changed), tuple(settings_changed))


def _changed_fields(old: Any, new: Any) -> tuple[str, ...]:
    return tuple(
        spec.name
        for spec in dataclasses.fields(old)
        if getattr(old, spec.name) != getattr(new, spec.name)
    )


def _configured_pods(settings: ServiceSettings) -> set[Pod]:
    """Return every pod that the settings name; none for registry discovery."""
    if settings.uses_registry:
        return set()
    if settings.pods:
        namespaces: tuple[str, ...] = ("",)
    else:
        namespaces = settings.namespaces
    pods: set[Pod] = set()
    for namespace in namespaces:
        addresses = settings.addresses(namespace) or ()
        pods.update(Pod(index, address) for index, address in enumerate(addresses))
    return pods


def _pod_names(pods: set[Pod]) -> tuple[str, ...]:
    ordered = sorted(pods, key=lambda pod: (pod.index, str(pod.address)))
    return tuple(f"{pod.index}@{pod.address}" for pod in ordered)


class Reloader:
    """Reloads the configuration of one proxy, one reload at a time.

    :param server: the running proxy.
    :param environ: the environment overrides as they were at start.
    """

    def __init__(self, server: ProxyServer, environ: Mapping[str, str]) -> None:
        self._server = server
        self._environ = dict(environ)
        self._lock = asyncio.Lock()
        self.reloads = 0
        self.rejected = 0

    async def reload(self) -> ReloadPlan:
        """Read, validate and apply the configuration file; return the changes.

        Raises `ReloadRejected` with every reason when the file is invalid,
        changes a setting that needs a restart, or the process is stopping.
        Nothing changes then.
        """
        source = self._server.config.source
        async with self._lock:
            try:
                plan, config = self._prepare(source)
            except ReloadRejected:
                self.rejected += 1
                raise
            await self._apply(config, plan)
            self.reloads += 1
            return plan

    async def reload_logged(self, origin: str) -> None:
        """Reload, and log the outcome in one line: INFO applied, ERROR rejected."""
        source = self._server.config.source
        try:
            plan = await self.reload()
        except ReloadRejected as exc:
            logger.error(
                "reload from %s rejected, the running configuration stays: %s: %s",
                origin,
                source,
                "; ".join(exc.problems),
                extra=REPEAT_EXEMPT,
            )
            return
        logger.info(
            "reloaded %s on %s: %s",
            source,
            origin,
            plan.describe(),
            extra=REPEAT_EXEMPT,
        )

    def _prepare(self, source: str) -> tuple[ReloadPlan, Config]:
        server = self._server
        if server.stopping:
            raise ReloadRejected(
                "stopping", ["the proxy is stopping, so it takes no reload"], source
            )
        try:
            config = load_config(source, self._environ)
        except ConfigError as exc:
            raise ReloadRejected("invalid_config", exc.problems, source) from None
        problems = restart_problems(server.config, config)
        if problems:
            raise ReloadRejected("restart_required", problems, source)
        return plan_reload(server.config, config), config

    async def _apply(self, config: Config, plan: ReloadPlan) -> None:
        """Apply `plan`, then stop the loops of the removed services.

        Everything before the first ``await`` runs without a request in
        between. Requests already routed to a removed pod or service finish
        on it.
        """
        server = self._server
        services = server.services
        for name in plan.removed:
            del services[name]
            server.failover.pop(name).detach()
            server.health_counts.pop(name, None)
            server.health_monitors.pop(name, None)
            server.states.forget(name)
            server.router.forget_service(name)
            server.metrics.forget_service(name)

        for change in plan.changed:
            service = services[change.name]
            service.reconfigure(config.services[change.name])
            server.failover[change.name].reconfigure()
            server.states.rebuild(change.name)
            pods = _configured_pods(service.settings)
            if not service.settings.uses_registry:
                server.health_counts[change.name].retain(pods)
                server.metrics.forget_pods(change.name, {pod.index for pod in pods})

        for name in plan.added:
            service = Service(config.services[name])
            services[name] = service
            server.failover[name] = FailoverHandler(
                service, server.store, server.states, server.router
            )
            server.health_counts[name] = TransitionCounts()
            server.start_service_loops(name)

        server.config = config
        server.router.link_ttl_s = config.store.temporary_link_ttl_s
        forwarder = server.forwarder
        if forwarder is not None:
            forwarder.reconfigure(config)
        server.metrics.set_services(services)

        for name in plan.removed:
            await server.stop_service_loops(name)
