"""Admin endpoints for links: read, set and remove the link of a UID.

These endpoints accept the configured services that serve the namespace.
They also accept the service of this sidecar's ``[pod]`` role in its own
namespace, so the application beside a pod can create persistent links.
After every change this proxy drops the link's entry from its local cache
and so routes on the new link at once. Other proxies on the same Redis
server drop their entry when Redis reports the change (`proxy.invalidation`);
on Redis Cluster they keep it until it expires (``store.local_cache_ttl_s``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admin_input import (
    JsonBody,
    check_link_ttl,
    check_namespace,
    check_pod_index,
    check_pod_of,
    check_service_name,
    check_uid,
    find_service,
    json_response,
    parse_duration,
    parse_pod_index,
    read_query,
    server_of,
)
from proxy.errors import RequestError
from proxy.podstate import now_ms
from proxy.store.base import PERSISTENT, LinkStore

if TYPE_CHECKING:
    from proxy.server import ProxyServer
    from proxy.services import Service

logger = logging.getLogger("stateful_route.admin")

LINK_MODES = ("set", "try_set", "set_if_absent")


def _pod_role_serves(server: ProxyServer, name: str, namespace: str) -> bool:
    pod = server.config.pod
    return pod is not None and pod.service == name and pod.namespace == namespace


def _link_service(server: ProxyServer, name: str, namespace: str) -> Service | None:
    """Return the configured service, or None for this sidecar's pod role.

    Raises 404 for any other service.
    """
    check_service_name(name)
    if name not in server.services and _pod_role_serves(server, name, namespace):
        return None
    return find_service(server, name, namespace)


def _link_services(server: ProxyServer, namespace: str) -> list[str]:
    names = [
        service.name
        for service in server.services.values()
        if service.settings.serves(namespace)
    ]
    pod = server.config.pod
    if pod is not None and _pod_role_serves(server, pod.service, namespace):
        names.append(pod.service)
    return list(dict.fromkeys(names))


def _link_path(request: web.Request) -> tuple[ProxyServer, str, str]:
    namespace = check_namespace(request.match_info["namespace"])
    uid = check_uid(request.match_info["uid"])
    return server_of(request), namespace, uid


async def _read_link(
    store: LinkStore, namespace: str, uid: str, service: str
) -> dict[str, object] | None:
    """Return the link as JSON fields, or None when there is none."""
    pod = await store.get(namespace, uid, service)
    if pod is None:
        return None
    ttl_s = await store.link_ttl(namespace, uid, service)
    if ttl_s is None:
        return None  # expired or removed between the two reads
    persistent = ttl_s == PERSISTENT
    return {
        "pod": pod,
        "persistent": persistent,
        "ttl_s": None if persistent else round(ttl_s, 3),
    }


async def get_links(request: web.Request) -> web.Response:
    """Return the persistent links of a UID and its link to every service."""
    server, namespace, uid = _link_path(request)
    read_query(request, ())
    store = server.store
    persistent = await store.linked_services(namespace, uid)
    links = {}
    for name in _link_services(server, namespace):
        link = await _read_link(store, namespace, uid, name)
        if link is not None:
            links[name] = link
    return json_response(
        {"namespace": namespace, "uid": uid, "persistent": persistent, "links": links}
    )


async def get_link(request: web.Request) -> web.Response:
    """Return the link of a UID to one service, or 404 when it has none."""
    server, namespace, uid = _link_path(request)
    read_query(request, ())
    name = request.match_info["service"]
    _link_service(server, name, namespace)
    link = await _read_link(server.store, namespace, uid, name)
    if link is None:
        raise RequestError(
            404,
            "no_link",
            f"UID {uid!r} has no link to service {name!r} in namespace {namespace!r}",
        )
    return json_response({"namespace": namespace, "uid": uid, "service": name, **link})


async def put_link(request: web.Request) -> web.Response:
    """Write a link with the store operation that ``mode`` names."""
    server, namespace, uid = _link_path(request)
    read_query(request, ())
    name = request.match_info["service"]
    service = _link_service(server, name, namespace)
    body = await JsonBody.read(request, ("pod", "ttl_s", "mode"))
    pod = body.integer("pod")
    if pod is None:
        raise RequestError(
            400,
            "invalid_field",
            "missing field 'pod': the pod index to link",
            field="pod",
        )
    check_pod_of(service, namespace, check_pod_index(pod, "pod"))
    ttl_s = body.number("ttl_s")
    ttl_s = PERSISTENT if ttl_s is None else check_link_ttl(ttl_s)
    mode = body.choice("mode", LINK_MODES) or "set"

    store = server.store
    result: dict[str, object] = {"mode": mode}
    if mode == "set":
        previous = await store.set(namespace, uid, name, pod, ttl_s)
        result.update(pod=pod, previous=previous)
    elif mode == "try_set":
        accepted, current = await store.try_set(namespace, uid, name, pod, ttl_s)
        if not accepted:
            details = {} if current is None else {"pod": current}
            raise RequestError(
                409,
                "link_conflict",
                f"UID {uid!r} has a persistent link to pod {current} of service "
                f"{name!r}; try_set does not replace it",
                **details,
            )
        result.update(accepted=True, pod=current)
    else:
        result["pod"] = await store.set_if_absent(namespace, uid, name, pod, ttl_s)
    if mode != "set_if_absent" or result["pod"] == pod:
        await _index(server, namespace, name, uid, result, ttl_s)
    _drop_cached(server, namespace, name, uid)
    logger.debug(
        "admin %s uid=%s service=%s namespace=%s pod=%d ttl_s=%g",
        mode,
        uid,
        name,
        namespace,
        pod,
        ttl_s,
    )
    return json_response(result)


async def delete_link(request: web.Request) -> web.Response:
    """Remove a link now or after ``delay_s``; with ``pod``, only if it names it."""
    server, namespace, uid = _link_path(request)
    query = read_query(request, ("delay_s", "pod"))
    name = request.match_info["service"]
    service = _link_service(server, name, namespace)
    delay_s = parse_duration(query.get("delay_s", "0"), "delay_s")
    pod_text = query.get("pod")

    store = server.store
    if pod_text is None:
        removed = await store.remove(namespace, uid, name, delay_s)
    else:
        pod = check_pod_of(service, namespace, parse_pod_index(pod_text, "pod"))
        removed = await store.remove_if_pod(namespace, uid, name, pod, delay_s)
    _drop_cached(server, namespace, name, uid)
    logger.debug(
        "admin removed=%s uid=%s service=%s namespace=%s delay_s=%g",
        removed,
        uid,
        name,
        namespace,
        delay_s,
    )
    return json_response({"removed": removed})


def _drop_cached(server: ProxyServer, namespace: str, service: str, uid: str) -> None:
    server.router.cache.drop((namespace, service, uid))


async def _index(
    server: ProxyServer,
    namespace: str,
    service: str,
    uid: str,
    result: dict[str, object],
    ttl_s: float,
) -> None:
    """Record a link written here in the per-pod index, as the router does."""
    pod = result.get("pod")
    previous = result.get("previous")
    if not isinstance(pod, int):
        return
    expires_ms = None if ttl_s == PERSISTENT else now_ms() + int(ttl_s * 1000)
    await server.store.index_link(
        namespace,
        service,
        pod,
        uid,
        expires_ms,
        previous_pod=previous if isinstance(previous, int) else None,
    )
