"""Admin endpoints for pod state: list the pods, drain, undrain, and the pod role.

A drain through this API writes the pod's record with ``DENY_NEW_CALL`` and
``drained_by = "admin"``. A sidecar publishing that pod's record adopts the
drain on its next publication and keeps it until an undrain writes READY.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admin_input import (
    JsonBody,
    check_pod_of,
    find_service,
    json_response,
    parse_pod_index,
    query_namespace,
    read_query,
    server_of,
)
from proxy.errors import RequestError
from proxy.podset import PodStatus, parse_records
from proxy.podside import PodAgent
from proxy.podstate import (
    DRAINED_BY_ADMIN,
    MAX_LOAD,
    MIN_LOAD,
    PodState,
    Routing,
    now_ms,
)
from proxy.stats import pod_metrics

if TYPE_CHECKING:
    from proxy.server import ProxyServer
    from proxy.services import Service

logger = logging.getLogger("stateful_route.admin")

_ROUTING_NAMES = tuple(routing.value for routing in Routing)


def record_json(state: PodState | None) -> dict[str, object] | None:
    if state is None:
        return None
    return {
        "load": state.load,
        "routing": state.routing.value,
        "updated_ms": state.updated_ms,
        "address": state.address,
        "drained_by": state.drained_by,
    }


def _pod_json(status: PodStatus, built_ms: int) -> dict[str, object]:
    state = status.state
    return {
        "index": status.pod.index,
        "address": str(status.pod.address),
        "record": record_json(state),
        "age_s": None if state is None else (built_ms - state.updated_ms) / 1000,
        "fresh": status.fresh,
        "available": status.available,
        "routable": status.routable,
        "reason": status.reason,
    }


def _left_out_json(
    index: int, state: PodState, service: Service, built_ms: int
) -> dict[str, object]:
    """Describe a registry record that is not in the pod set."""
    fresh = state.is_fresh(built_ms, service.settings.state_stale_after_s)
    return {
        "index": index,
        "address": state.address,
        "record": record_json(state),
        "age_s": (built_ms - state.updated_ms) / 1000,
        "fresh": fresh,
        "available": False,
        "routable": False,
        "reason": "no address" if fresh else "stale",
    }


async def list_pods(request: web.Request) -> web.Response:
    """Read the records now and return every pod with what its record allows."""
    server = server_of(request)
    namespace = query_namespace(server, read_query(request, ("namespace",)))
    service = find_service(server, request.match_info["service"], namespace)

    pod_set = await server.states.refresh(namespace, service.name)
    raw = await server.store.read_pod_states(namespace, service.name)
    records, problems = parse_records(raw)

    pods = [_pod_json(status, pod_set.built_ms) for status in pod_set.statuses.values()]
    if service.name in server.services:
        # What this proxy measured of each pod, and the load figure that
        # combines it with the reported load.
        metrics = {
            row["index"]: row for row in pod_metrics(server, namespace, service.name)
        }
        for pod in pods:
            pod["metrics"] = metrics.get(pod["index"])
    if service.settings.uses_registry:
        # Registry discovery leaves stale records and records without an
        # address out of the pod set; list them so an operator sees why.
        for index, state in sorted(records.items()):
            if index not in pod_set.statuses:
                pods.append(_left_out_json(index, state, service, pod_set.built_ms))
    return json_response(
        {
            "namespace": namespace,
            "service": service.name,
            "discovery": service.settings.discovery,
            "pods": pods,
            "problems": problems,
        }
    )


async def drain_pod(request: web.Request) -> web.Response:
    """Write DENY_NEW_CALL for one pod: linked users stay, new users go elsewhere."""
    return await _write_routing(request, Routing.DENY_NEW_CALL, DRAINED_BY_ADMIN)


async def undrain_pod(request: web.Request) -> web.Response:
    """Write READY for one pod, ending a drain."""
    return await _write_routing(request, Routing.READY, None)


async def _write_routing(
    request: web.Request, routing: Routing, drained_by: str | None
) -> web.Response:
    server = server_of(request)
    namespace = query_namespace(server, read_query(request, ("namespace",)))
    service = find_service(server, request.match_info["service"], namespace)
    index = check_pod_of(
        service, namespace, parse_pod_index(request.match_info["index"], "pod")
    )

    current = await _current_record(server, namespace, service, index)
    record: PodState | None = PodState(
        load=0 if current is None else current.load,
        routing=routing,
        updated_ms=now_ms(),
        address=None if current is None else current.address,
        drained_by=drained_by,
    )
    settings = service.settings
    if (
        routing is Routing.READY
        and not settings.require_pod_state
        and not settings.uses_registry
        and (current is None or current.drained_by == DRAINED_BY_ADMIN)
    ):
        # Delete the drain record instead, or write nothing when there is
        # none, so a pod without a publisher counts as READY; a pod with a
        # sidecar republishes READY. A READY record that no sidecar republishes would
        # go stale and make the pod unavailable.
        record = None
        if current is not None:
            await server.store.remove_pod_state(namespace, service.name, index)
    else:
        assert record is not None
        await server.store.publish_pod_state(
            namespace, service.name, index, record.encode()
        )
    await server.states.refresh(namespace, service.name)
    logger.info(
        "admin set pod=%d service=%s namespace=%s to %s",
        index,
        service.name,
        namespace,
        routing.value,
    )
    return json_response(
        {
            "namespace": namespace,
            "service": service.name,
            "index": index,
            "routing": routing.value,
            "record": record_json(record),
        }
    )


async def _current_record(
    server: ProxyServer, namespace: str, service: Service, index: int
) -> PodState | None:
    """Return the pod's valid record, rejecting pods that a write must not touch.

    An invalid record counts as none, as routing counts it.
    """
    raw = await server.store.read_pod_states(namespace, service.name)
    records, _ = parse_records(raw)
    current = records.get(index)
    settings = service.settings
    if settings.uses_registry:
        in_pod_set = (
            current is not None
            and current.address is not None
            and current.is_fresh(now_ms(), settings.state_stale_after_s)
        )
        if not in_pod_set:
            # A new record would have no address, and rewriting a stale one
            # would bring a departed pod back into the pod set.
            raise RequestError(
                404,
                "unknown_pod",
                f"pod {index} of service {service.name!r} in namespace "
                f"{namespace!r} has no fresh record with an address, so it is "
                "not in the pod set",
                pod=index,
            )
    if current is not None and current.routing is Routing.SHUTDOWN:
        raise RequestError(
            409,
            "pod_shut_down",
            f"pod {index} of service {service.name!r} published SHUTDOWN; it "
            "returns when its sidecar publishes again",
            pod=index,
        )
    return current


def _pod_agent(server: ProxyServer) -> PodAgent:
    if server.pod_agent is None:
        raise RequestError(
            404,
            "no_pod_role",
            "this sidecar has no [pod] section, so it publishes no pod state",
        )
    return server.pod_agent


async def get_pod_state(request: web.Request) -> web.Response:
    """Return the state of this sidecar's own pod."""
    read_query(request, ())
    return json_response(_pod_agent(server_of(request)).describe())


async def put_pod_state(request: web.Request) -> web.Response:
    """Take the load or routing state the application reports, and publish it."""
    read_query(request, ())
    agent = _pod_agent(server_of(request))
    body = await JsonBody.read(request, ("load", "routing"))
    load = body.integer("load")
    if load is not None and not MIN_LOAD <= load <= MAX_LOAD:
        raise RequestError(
            400,
            "invalid_field",
            f"load {load} is invalid: expected a signed 64-bit integer",
            field="load",
        )
    routing_name = body.choice("routing", _ROUTING_NAMES)
    if load is None and routing_name is None:
        raise RequestError(
            400,
            "invalid_field",
            "request body sets nothing: give load, routing or both",
        )
    routing = None if routing_name is None else Routing(routing_name)
    if routing is Routing.SHUTDOWN:
        raise RequestError(
            400,
            "invalid_field",
            "routing 'SHUTDOWN' cannot be reported: the sidecar publishes it "
            "when it stops; report READY or DENY_NEW_CALL",
            field="routing",
        )

    try:
        agent.report(load, routing)
    except ValueError as exc:
        # The pod is stopping: its routing state is final.
        raise RequestError(409, "pod_stopping", str(exc)) from None
    await agent.publish()
    logger.debug("pod reported load=%s routing=%s", load, routing_name)
    return json_response(agent.describe())
