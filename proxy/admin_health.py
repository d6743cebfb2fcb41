"""Admin endpoints for health checks and failover.

``GET /v1/services/{service}/health`` shows what this proxy's health checks
found of each pod, ``GET /v1/services/{service}/history`` the failover
history, and ``POST /v1/links/{namespace}/{uid}/{service}/migrate`` moves one
user to a chosen pod.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admin_input import (
    JsonBody,
    check_namespace,
    check_pod_index,
    check_pod_of,
    check_uid,
    find_service,
    json_response,
    query_namespace,
    read_query,
    server_of,
)
from proxy.errors import RequestError
from proxy.failover import MigrationRejected
from proxy.health import HealthTable
from proxy.podstate import now_ms

if TYPE_CHECKING:
    from proxy.pods import Pod
    from proxy.server import ProxyServer

# HTTP status of each reason `migrate_user` rejects a migration for.
_REJECTION_STATUS = {
    "unknown_pod": 404,
    "no_link": 404,
    "pod_not_routable": 409,
    "pod_unhealthy": 409,
    "link_changed": 409,
}


def add_health_routes(router: web.UrlDispatcher) -> None:
    """Route the health, history and migrate endpoints."""
    service = "/v1/services/{service:[^/]+}"
    router.add_get(service + "/health", get_health)
    router.add_get(service + "/history", get_history)
    router.add_post(
        "/v1/links/{namespace:[^/]+}/{uid:[^/]+}/{service:[^/]+}/migrate", migrate
    )


def _pod_json(server: ProxyServer, health: HealthTable, pod: Pod) -> dict[str, object]:
    state = health.state(pod)
    entry = health.get(pod)
    now = health.now()
    counts = server.health_counts.get(health.service)
    pod_json: dict[str, object] = {
        "index": pod.index,
        "address": str(pod.address),
        "usable": health.usable(pod),
        "state": state.value,
        "slow_start_share": round(health.slow_start_share(pod), 3),
        "transitions": {
            "down": 0 if counts is None else counts.down[pod],
            "up": 0 if counts is None else counts.up[pod],
        },
    }
    if entry is None:
        pod_json["probe"] = {
            "healthy": True,
            "consecutive_successes": 0,
            "consecutive_failures": 0,
            "probes": 0,
            "failed_probes": 0,
            "last_error": None,
        }
        pod_json["passive"] = {
            "consecutive_failures": 0,
            "last_failure": None,
            "ejected": False,
            "ejected_until_ms": None,
            "ejections": 0,
            "refused_ejections": 0,
        }
        return pod_json

    until = entry.ejected_until
    pod_json["probe"] = {
        "healthy": entry.probe_healthy,
        "consecutive_successes": entry.probe_successes,
        "consecutive_failures": entry.probe_failures,
        "probes": entry.probes,
        "failed_probes": entry.failed_probes,
        "last_error": entry.last_probe_error or None,
    }
    pod_json["passive"] = {
        "consecutive_failures": entry.passive_failures,
        "last_failure": entry.last_failure or None,
        "ejected": until is not None,
        "ejected_until_ms": None
        if until is None
        else now_ms() + round((until - now) * 1000),
        "ejections": entry.ejections,
        "refused_ejections": entry.refused_ejections,
    }
    return pod_json


async def get_health(request: web.Request) -> web.Response:
    """Return what this proxy's health checks found of every pod of a service."""
    server = server_of(request)
    namespace = query_namespace(server, read_query(request, ("namespace",)))
    service = find_service(server, request.match_info["service"], namespace)
    health = service.health

    pod_set = server.states.get(namespace, service.name)
    if pod_set is not None:
        pods = [status.pod for status in pod_set.statuses.values()]
    else:
        pods = list(service.pods(namespace) or ())
    settings = service.settings
    return json_response(
        {
            "namespace": namespace,
            "service": service.name,
            "active_checks": bool(settings.health_check_path),
            "health_check_path": settings.health_check_path or None,
            "panic": namespace in health.panic_namespaces,
            "panic_entries": health.panic_entries,
            "panic_routes": health.panic_routes,
            "pods": [_pod_json(server, health, pod) for pod in pods],
        }
    )


async def get_history(request: web.Request) -> web.Response:
    """Return the failover history of a service, newest first."""
    server = server_of(request)
    namespace = query_namespace(server, read_query(request, ("namespace",)))
    service = find_service(server, request.match_info["service"], namespace)
    history = server.failover[service.name].history
    return json_response(
        {
            "service": service.name,
            "history_size": history.size,
            "events": [event.as_json() for event in history.events()],
        }
    )


async def migrate(request: web.Request) -> web.Response:
    """Move one user to the pod given in the body, with a compare-and-set."""
    server = server_of(request)
    namespace = check_namespace(request.match_info["namespace"])
    uid = check_uid(request.match_info["uid"])
    read_query(request, ())
    service = find_service(server, request.match_info["service"], namespace)
    body = await JsonBody.read(request, ("pod",))
    pod = body.integer("pod")
    if pod is None:
        raise RequestError(
            400,
            "invalid_field",
            "missing field 'pod': the pod index to move the user to",
            field="pod",
        )
    check_pod_of(service, namespace, check_pod_index(pod, "pod"))

    handler = server.failover[service.name]
    try:
        migration = await handler.migrate_user(namespace, uid, pod)
    except MigrationRejected as exc:
        details = {} if exc.pod is None else {"pod": exc.pod}
        raise RequestError(
            _REJECTION_STATUS[exc.code], exc.code, exc.message, **details
        ) from None
    return json_response(
        {
            "namespace": namespace,
            "uid": uid,
            "service": service.name,
            "pod": migration.pod,
            "previous": migration.previous,
            "moved": migration.moved,
            "persistent": migration.persistent,
        }
    )
