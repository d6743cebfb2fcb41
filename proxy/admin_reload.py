"""Admin endpoint of live reload: read the configuration file again."""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.admin_input import json_response, read_query, server_of
from proxy.logs import REPEAT_EXEMPT
from proxy.reload import ReloadRejected

logger = logging.getLogger("stateful_route.reload")

# HTTP status of each reason a reload is rejected for.
_REJECTION_STATUS = {
    "invalid_config": 400,
    "restart_required": 409,
    "stopping": 503,
}


async def reload_config(request: web.Request) -> web.Response:
    """Reload the configuration file; return the changes, or every problem.

    The body, if any, is ignored: the proxy always reads the file it started
    with.
    """
    read_query(request, ())
    reloader = server_of(request).reloader
    try:
        plan = await reloader.reload()
    except ReloadRejected as exc:
        logger.error(
            "reload from the admin API rejected, the running configuration "
            "stays: %s: %s",
            exc.source,
            "; ".join(exc.problems),
            extra=REPEAT_EXEMPT,
        )
        return json_response(
            {
                "error": exc.code,
                "message": f"reload of {exc.source} rejected, the running "
                "configuration stays",
                "source": exc.source,
                "problems": exc.problems,
            },
            status=_REJECTION_STATUS[exc.code],
        )
    source = server_of(request).config.source
    logger.info(
        "reloaded %s on the admin API: %s",
        source,
        plan.describe(),
        extra=REPEAT_EXEMPT,
    )
    return json_response({"status": "reloaded", "source": source, **plan.as_json()})
