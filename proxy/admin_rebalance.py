"""Admin endpoint of rebalancing: plan it, or run it once now."""

from __future__ import annotations

from aiohttp import web

from proxy.admin_input import (
    find_service,
    json_response,
    query_namespace,
    read_query,
    server_of,
)
from proxy.errors import RequestError

# Upper bound of `max` for one call, so a request cannot run for hours at
# the configured rate.
MAX_REMOVALS_PER_CALL = 10_000
DEFAULT_REMOVALS_PER_CALL = 100


async def rebalance(request: web.Request) -> web.Response:
    """Return the rebalancing plan, and run it unless ``dry_run=true``.

    A real run removes at most ``max`` links at the service's rate, so the
    reply waits for roughly max / rebalance_rate_per_s seconds.
    """
    server = server_of(request)
    query = read_query(request, ("namespace", "dry_run", "max"))
    namespace = query_namespace(server, query)
    service = find_service(server, request.match_info["service"], namespace)
    dry_run = _parse_bool(query.get("dry_run", "true"), "dry_run")
    max_removals = _parse_count(query.get("max"), "max")

    result = await server.rebalancer.run_once(
        namespace, service, dry_run=dry_run, max_removals=max_removals
    )
    return json_response(result.as_json())


def _parse_bool(text: str, name: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise RequestError(
        400,
        "invalid_parameter",
        f"{name}={text!r}: expected true or false",
        parameter=name,
    )


def _parse_count(text: str | None, name: str) -> int:
    if text is None:
        return DEFAULT_REMOVALS_PER_CALL
    if not text.isdigit() or not 1 <= int(text) <= MAX_REMOVALS_PER_CALL:
        raise RequestError(
            400,
            "invalid_parameter",
            f"{name}={text!r}: expected an integer from 1 to {MAX_REMOVALS_PER_CALL}",
            parameter=name,
        )
    return int(text)
