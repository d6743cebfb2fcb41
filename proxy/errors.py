"""Errors raised by stateful-route.

Every error derives from `StatefulRouteError`. Where callers expect a standard
exception, an error also derives from it: a configuration error is a
`ValueError`, a store outage is a `ConnectionError`.
"""

from __future__ import annotations

from collections.abc import Sequence


class StatefulRouteError(Exception):
    """Root of the errors raised by this package."""


class ConfigError(StatefulRouteError, ValueError):
    """A configuration that failed validation, with one line per problem."""

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(self.problems))


class StoreError(StatefulRouteError):
    """A link store operation that failed."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The link store could not be reached or did not reply in time."""

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"{backend} store unavailable: {reason}")


class StoreBusyError(StoreError):
    """The store client had no free connection in time: local overload.

    Unlike an outage, the store itself responds, so routing must not fall
    back to placement without links, which could split a user over pods.
    """

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = reason
        super().__init__(f"{backend} store busy: {reason}")


class StoreDataError(StoreError, ValueError):
    """A value in the store that does not follow the documented layout."""

    def __init__(self, key: str, value: object) -> None:
        self.key = key
        self.value = value
        super().__init__(f"invalid value {value!r} at key {key!r}")


class RequestError(StatefulRouteError):
    """A client request that the proxy rejects before forwarding it.

    `status` is the HTTP status to send, `code` a short machine-readable name
    and `details` extra fields for the JSON body (the header, the value).
    """

    def __init__(
        self, status: int, code: str, message: str, **details: str | int
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        super().__init__(message)


class NoPodError(StatefulRouteError):
    """A service that has no pod that can take the request."""

    def __init__(self, namespace: str, service: str) -> None:
        self.namespace = namespace
        self.service = service
        super().__init__(f"service {service!r} in namespace {namespace!r} has no pod")
