"""Reading and validating the values of admin API requests.

Every namespace, UID, service, pod index and duration taken from a path, a
query string or a JSON body passes through these functions before it
reaches the store. A bad value raises `RequestError` with a message naming
it, and the admin app sends that as a JSON error.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from proxy.errors import RequestError
from proxy.names import dns_label_problem, uid_problem
from proxy.store.base import PERSISTENT

if TYPE_CHECKING:
    from proxy.server import ProxyServer
    from proxy.services import Service

SERVER_KEY = web.AppKey["ProxyServer"]("server")

# StatefulSet ordinals are 32-bit signed integers.
MAX_POD_INDEX = 2**31 - 1
# TTLs and removal delays above ten years are rejected: no link lives that
# long, so such a value is most likely milliseconds sent as seconds.
MAX_DURATION_S = 10 * 365 * 24 * 3600.0
# Values quoted in messages are cut to this many characters.
_SHOWN_LENGTH = 80


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json"
    )


def server_of(request: web.Request) -> ProxyServer:
    return request.app[SERVER_KEY]


def shown(value: object) -> str:
    """Return `value` quoted for a message, cut when it is long."""
    text = repr(value)
    if len(text) > _SHOWN_LENGTH:
        return text[:_SHOWN_LENGTH] + "..."
    return text


def read_query(request: web.Request, allowed: Collection[str]) -> dict[str, str]:
    """Return the query parameters; reject unknown and repeated ones.

    A misspelt ``namespace`` would otherwise act on the default namespace.
    """
    values: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            expected = ", ".join(sorted(allowed)) or "none"
            raise RequestError(
                400,
                "invalid_parameter",
                f"unknown query parameter {shown(name)}; expected: {expected}",
                parameter=name,
            )
        if name in values:
            raise RequestError(
                400,
                "invalid_parameter",
                f"query parameter {name!r} appears more than once",
                parameter=name,
            )
        values[name] = value
    return values


def check_namespace(namespace: str) -> str:
    problem = dns_label_problem(namespace)
    if problem is not None:
        raise RequestError(
            400, "invalid_namespace", f"namespace {shown(namespace)} {problem}"
        )
    return namespace


def query_namespace(server: ProxyServer, query: dict[str, str]) -> str:
    """Return the ``namespace`` query parameter, or the default namespace."""
    namespace = query.get("namespace")
    if namespace is None:
        return server.config.proxy.default_namespace
    return check_namespace(namespace)


def check_uid(uid: str) -> str:
    problem = uid_problem(uid)
    if problem is not None:
        raise RequestError(400, "invalid_uid", f"UID {shown(uid)} {problem}")
    return uid


def check_service_name(name: str) -> str:
    problem = dns_label_problem(name)
    if problem is not None:
        raise RequestError(400, "invalid_service", f"service {shown(name)} {problem}")
    return name


def find_service(server: ProxyServer, name: str, namespace: str) -> Service:
    """Return the configured service `name` serving `namespace`, or raise 404."""
    check_service_name(name)
    service = server.services.get(name)
    if service is None:
        raise RequestError(
            404,
            "unknown_service",
            f"service {name!r} is not configured on this proxy",
            service=name,
        )
    if not service.settings.serves(namespace):
        raise RequestError(
            404,
            "unknown_namespace",
            f"service {name!r} is not configured in namespace {namespace!r}",
            service=name,
            namespace=namespace,
        )
    return service


def parse_pod_index(text: str, name: str) -> int:
    """Parse a pod index given as text in a path or query string."""
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise RequestError(
            400,
            "invalid_pod",
            f"{name} {shown(text)} is not a pod index: expected an integer "
            f"from 0 to {MAX_POD_INDEX}",
        )
    return check_pod_index(int(text), name)


def check_pod_index(index: int, name: str) -> int:
    if not 0 <= index <= MAX_POD_INDEX:
        raise RequestError(
            400,
            "invalid_pod",
            f"{name} {index} is not a pod index: expected an integer "
            f"from 0 to {MAX_POD_INDEX}",
        )
    return index


def check_pod_of(service: Service | None, namespace: str, index: int) -> int:
    """Reject an index past the pods of a statically configured service.

    A registry service, or None for a service known only as this sidecar's
    pod role, takes any index.
    """
    if service is None or service.settings.uses_registry:
        return index
    count = service.pod_count(namespace)
    if index >= count:
        raise RequestError(
            400,
            "invalid_pod",
            f"pod {index} is out of range: service {service.name!r} has {count} "
            f"pods in namespace {namespace!r}, indexes 0 to {count - 1}",
            pod=index,
        )
    return index


def parse_duration(text: str, name: str) -> float:
    """Parse a query parameter of seconds >= 0, such as ``delay_s``."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DURATION_S:
        raise RequestError(
            400,
            "invalid_parameter",
            f"{name} {shown(text)} is invalid: expected a number of seconds "
            f"from 0 to {MAX_DURATION_S:.0f}",
            parameter=name,
        )
    return seconds


def check_link_ttl(ttl_s: float) -> float:
    """Accept -1 for a persistent link, or seconds > 0 up to the maximum."""
    if ttl_s == PERSISTENT or 0 < ttl_s <= MAX_DURATION_S:
        return ttl_s
    raise RequestError(
        400,
        "invalid_field",
        f"ttl_s {ttl_s:g} is invalid: expected -1 for a persistent link, or "
        f"seconds above 0 and at most {MAX_DURATION_S:.0f}",
        field="ttl_s",
    )


class JsonBody:
    """The fields of a JSON object request body, checked as they are read."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    @classmethod
    async def read(cls, request: web.Request, allowed: Collection[str]) -> JsonBody:
        """Parse the body; reject invalid JSON, non-objects and unknown fields."""
        data = await request.read()
        if not data.strip():
            raise RequestError(
                400, "invalid_json", "missing request body: expected a JSON object"
            )
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RequestError(
                400, "invalid_json", f"request body is not valid JSON: {exc}"
            ) from None
        if not isinstance(document, dict):
            raise RequestError(
                400,
                "invalid_json",
                f"request body is {_json_type(document)}, expected a JSON object",
            )
        for name in document:
            if name not in allowed:
                expected = ", ".join(sorted(allowed))
                raise RequestError(
                    400,
                    "invalid_field",
                    f"unknown field {shown(name)}; expected: {expected}",
                    field=name,
                )
        return cls(document)

    def __len__(self) -> int:
        return len(self._fields)

    def integer(self, name: str) -> int | None:
        """Return an integer field, or None when absent; booleans are rejected."""
        value = self._fields.get(name)
        if name not in self._fields:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong_type(name, value, "an integer")
        return value

    def number(self, name: str) -> float | None:
        """Return a number field as a float, or None when absent."""
        value = self._fields.get(name)
        if name not in self._fields:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._wrong_type(name, value, "a number")
        return float(value)

    def choice(self, name: str, choices: Collection[str]) -> str | None:
        """Return a string field that must be one of `choices`, or None."""
        value = self._fields.get(name)
        if name not in self._fields:
            return None
        expected = " or ".join(repr(choice) for choice in choices)
        if not isinstance(value, str):
            raise self._wrong_type(name, value, expected)
        if value not in choices:
            raise RequestError(
                400,
                "invalid_field",
                f"{name} {shown(value)} is invalid: expected {expected}",
                field=name,
            )
        return value

    @staticmethod
    def _wrong_type(name: str, value: object, expected: str) -> RequestError:
        return RequestError(
            400,
            "invalid_field",
            f"{name} must be {expected}, got {_json_text(value)}",
            field=name,
        )


def _json_text(value: object) -> str:
    """Return `value` as JSON text for a message, cut when it is long."""
    text = orjson.dumps(value).decode()
    if len(text) > _SHOWN_LENGTH:
        return text[:_SHOWN_LENGTH] + "..."
    return text


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
