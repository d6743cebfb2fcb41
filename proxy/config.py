"""Configuration: frozen dataclasses loaded from ``config.toml``.

`load_config` reads the file, applies environment overrides and validates
everything at once, so a bad file is reported with one line per problem.
An override is named ``STATEFUL_ROUTE_<SECTION>_<KEY>`` (for example
``STATEFUL_ROUTE_STORE_REDIS_URL``) and exists for every scalar key of the
sections ``proxy``, ``admin``, ``store`` and ``log``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError
from proxy.names import dns_label_problem
from proxy.pods import Address, parse_address
from proxy.statuses import StatusRanges

ENV_PREFIX = "STATEFUL_ROUTE_"
# An HTTP field name: a token of RFC 9110, section 5.6.2.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
STRATEGIES = (
    "round_robin",
    "least_connections",
    "weighted_round_robin",
    "least_response_time",
    "lowest_load",
    "consistent_hash",
)
DISCOVERY_MODES = ("static", "registry")
STORE_BACKENDS = ("memory", "redis")
LOG_LEVELS = ("debug", "info", "warning", "error")
TEMPLATE_FIELDS = ("service", "index", "namespace")


def _setting(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    choices: tuple[str, ...] = (),
) -> Any:
    """Declare a field with its validation bounds kept in the metadata."""
    metadata = {"low": low, "high": high, "above": above, "choices": choices}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    """The ``[proxy]`` section: where the proxy listens and how it reads requests."""

    host: str = "127.0.0.1"
    port: int = _setting(8080, low=0, high=65535)
    namespace_header: str = "X-Namespace"
    uid_header: str = "X-Uid"
    service_header: str = "X-Service"
    routed_pod_header: str = "X-Routed-Pod"
    default_namespace: str = "default"
    default_service: str = ""
    shutdown_timeout_s: float = _setting(10.0, low=0)
    upstream_connections_per_pod: int = _setting(256, low=1)
    upstream_idle_timeout_s: float = _setting(30.0, above=0)
    # Limits and timeouts of client requests, described in docs/http.md.
    max_request_line_bytes: int = _setting(16384, low=256, high=1024 * 1024)
    max_header_field_bytes: int = _setting(32768, low=256, high=1024 * 1024)
    max_header_bytes: int = _setting(65536, low=256, high=16 * 1024 * 1024)
    max_header_count: int = _setting(128, low=8, high=10_000)
    # 0 turns the body limit off.
    max_body_bytes: int = _setting(1024**3, low=0)
    header_timeout_s: float = _setting(15.0, above=0)
    body_timeout_s: float = _setting(30.0, above=0)
    keepalive_timeout_s: float = _setting(75.0, above=0)
    # Peers, as CIDR networks, whose X-Forwarded-* headers are kept.
    trusted_proxies: tuple[str, ...] = ()
    # Processes serving proxy.port with SO_REUSEPORT under one supervisor.
    workers: int = _setting(1, low=1, high=64)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSettings:
    """The ``[admin]`` section: the admin API, on loopback by default."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = _setting(9901, low=0, high=65535)
    # Bearer token that every endpoint but /healthz and /readyz requires;
    # "" leaves the API open. Kept out of repr() so it never reaches a log.
    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSettings:
    """The ``[store]`` section: where links live and how long."""

    backend: str = _setting("memory", choices=STORE_BACKENDS)
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = _setting(1.0, above=0)
    redis_connect_timeout_s: float = _setting(1.0, above=0)
    redis_retries: int = _setting(2, low=0, high=10)
    redis_max_connections: int = _setting(32, low=1)
    # Pool connections idle longer than this are closed, down to
    # redis_min_idle_connections, and 0 keeps them open.
    redis_idle_timeout_s: float = _setting(30.0, low=0)
    redis_min_idle_connections: int = _setting(4, low=0)
    temporary_link_ttl_s: float = _setting(300.0, above=0)
    local_cache_ttl_s: float = _setting(240.0, low=0)
    local_cache_size: int = _setting(100_000, low=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """The ``[log]`` section."""

    level: str = _setting("info", choices=LOG_LEVELS)
    format: str = _setting("text", choices=("text", "json"))
    access_log: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSettings:
    """One ``[services.NAME]`` section: the pods of a service and how to reach them.

    With ``discovery = "static"`` the pods come either from `pods` (pod
    index = position in the list) or from `address_template` expanded for
    index 0 to `replicas` - 1 in each namespace of `namespaces`. With
    ``discovery = "registry"`` the pods are those with a fresh state record
    in the store, each reached at the address it published.
    """

    name: str
    strategy: str = _setting("round_robin", choices=STRATEGIES)
    pods: tuple[str, ...] = ()
    address_template: str = ""
    replicas: int = _setting(0, low=0, high=10_000)
    namespaces: tuple[str, ...] = ()
    connect_timeout_s: float = _setting(2.0, above=0)
    read_timeout_s: float = _setting(30.0, above=0)
    # Request-level retries, described in docs/retries.md.
    retry_attempts: int = _setting(1, low=0, high=10)
    retry_budget_percent: float = _setting(20.0, low=0, high=100)
    retry_budget_window_s: float = _setting(10.0, above=0)
    retry_min_per_s: float = _setting(3.0, low=0)
    retry_buffer_bytes: int = _setting(65536, low=0, high=16 * 1024 * 1024)
    allow_without_uid: bool = False
    discovery: str = _setting("static", choices=DISCOVERY_MODES)
    require_pod_state: bool = False
    state_stale_after_s: float = _setting(60.0, above=0)
    state_refresh_s: float = _setting(2.0, above=0)
    load_range: int = _setting(500, low=0)
    # One weight per entry of `pods`, in the same order, for weighted_round_robin
    # only.
    weights: tuple[int, ...] = ()
    ewma_decay_s: float = _setting(10.0, above=0)
    load_factor: float = _setting(1.25, above=1)
    rebalance: bool = False
    rebalance_factor: float = _setting(1.5, above=1)
    rebalance_rate_per_s: float = _setting(10.0, above=0)
    rebalance_interval_s: float = _setting(30.0, above=0)
    # Health checks and failover, described in docs/health.md. An empty
    # health_check_path turns the active probes off, but passive detection
    # of failing pods on the proxied traffic runs either way.
    health_check_path: str = ""
    health_interval_s: float = _setting(5.0, above=0)
    health_timeout_s: float = _setting(2.0, above=0)
    healthy_threshold: int = _setting(2, low=1, high=1000)
    unhealthy_threshold: int = _setting(3, low=1, high=1000)
    # Probe statuses that count as a success: "404" or ranges such as "200-399".
    expected_statuses: tuple[str, ...] = ("200-399",)
    # Failed requests in a row that eject a pod, or 0 to turn ejection off.
    consecutive_failures: int = _setting(5, low=0, high=100_000)
    base_ejection_s: float = _setting(30.0, above=0)
    max_ejection_s: float = _setting(300.0, above=0)
    max_ejection_percent: int = _setting(50, low=0, high=100)
    slow_start_s: float = _setting(30.0, low=0)
    max_moves_per_s: float = _setting(100.0, above=0)
    history_size: int = _setting(100, low=0, high=100_000)

    @property
    def uses_registry(self) -> bool:
        return self.discovery == "registry"

    def serves(self, namespace: str) -> bool:
        """Return whether requests of `namespace` may reach this service."""
        if self.pods:
            return True
        return not self.namespaces or namespace in self.namespaces

    def addresses(self, namespace: str) -> tuple[Address, ...] | None:
        """Return the pod addresses in `namespace`, or None when it is not served.

        Static pods serve every namespace; a templated service serves only
        the namespaces it lists, because the namespace is part of the host.
        """
        if self.pods:
            return tuple(parse_address(pod) for pod in self.pods)
        if self.uses_registry or namespace not in self.namespaces:
            return None
        return tuple(
            parse_address(self.expand_template(namespace, index))
            for index in range(self.replicas)
        )

    def expand_template(self, namespace: str, index: int) -> str:
        """Return `address_template` filled in for one pod."""
        return self.address_template.format(
            service=self.name, index=index, namespace=namespace
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PodSettings:
    """The ``[pod]`` section: the sidecar's role beside one stateful pod.

    Present, it makes ``run`` also forward inbound traffic from `host:port`
    to the application at `app_address` and publish the pod's state record.
    """

    namespace: str = "default"
    service: str = ""
    index: int = _setting(-1, low=-1)
    app_address: str = ""
    host: str = "127.0.0.1"
    port: int = _setting(8000, low=0, high=65535)
    advertise_address: str = ""
    publish_period_s: float = _setting(30.0, above=0)
    drain_s: float = _setting(-1.0, low=-1)
    cpu_factor: float = _setting(0.7, low=0, high=1)
    connect_timeout_s: float = _setting(2.0, above=0)
    read_timeout_s: float = _setting(30.0, above=0)
    # Routers whose X-Forwarded-For chain the application gets, extended by
    # the router's address; from other peers the chain is replaced.
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration of one proxy process."""

    proxy: ProxySettings = field(default_factory=ProxySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    log: LogSettings = field(default_factory=LogSettings)
    services: Mapping[str, ServiceSettings] = field(default_factory=dict)
    pod: PodSettings | None = None
    source: str = ""


_SECTIONS: dict[str, type[Any]] = {
    "proxy": ProxySettings,
    "admin": AdminSettings,
    "store": StoreSettings,
    "log": LogSettings,
}


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment and validate one configuration file.

    Raises `ConfigError` with every problem found, each naming the key.
    """
    source = str(path)
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError([f"file not found: {source}"], source) from None
    except OSError as exc:
        raise ConfigError([f"cannot read {source}: {exc.strerror}"], source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], source) from None
    return parse_config(document, environ=environ, source=source)


def parse_config(
    document: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    source: str = "",
) -> Config:
    """Build a validated `Config` from a parsed TOML document."""
    problems: list[str] = []
    environ = os.environ if environ is None else environ

    for key in document:
        if key not in _SECTIONS and key not in ("services", "pod"):
            problems.append(f"unknown section [{key}]")

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = document.get(name, {})
        if not isinstance(table, dict):
            problems.append(f"[{name}] must be a table, got {_type_name(table)}")
            table = {}
        values = dict(table)
        values.update(_environment_overrides(name, cls, environ, problems))
        sections[name] = _build(cls, values, f"{name}.", problems)

    services: dict[str, ServiceSettings] = {}
    service_tables = document.get("services", {})
    if not isinstance(service_tables, dict):
        problems.append(f"[services] must be a table, got {_type_name(service_tables)}")
        service_tables = {}
    for name, table in service_tables.items():
        key = f"services.{name}"
        label_problem = dns_label_problem(name)
        if label_problem is not None:
            problems.append(f"[{key}]: service name {name!r} {label_problem}")
            continue
        if not isinstance(table, dict):
            problems.append(f"[{key}] must be a table, got {_type_name(table)}")
            continue
        service = _build(ServiceSettings, {**table, "name": name}, key + ".", problems)
        if service is not None:
            services[name] = _check_service(service, sections["proxy"], problems)

    pod = None
    _check_environment_names(environ, problems)
    pod_variables = [name for name in environ if name.startswith(ENV_PREFIX + "POD_")]
    if "pod" in document or pod_variables:
        pod = _parse_pod(document.get("pod", {}), environ, problems)

    declared = bool(service_tables) or "pod" in document or bool(pod_variables)
    _check_cross_section(sections, services, pod, declared, problems)
    default_service = sections["proxy"].default_service
    if default_service and default_service not in service_tables:
        # A section that is declared but invalid reports its own problems.
        problems.append(
            f"proxy.default_service = {default_service!r}: "
            "no [services] section with that name"
        )
    if problems:
        raise ConfigError(problems, source)
    return Config(**sections, services=services, pod=pod, source=source)


def _parse_pod(
    table: Any, environ: Mapping[str, str], problems: list[str]
) -> PodSettings | None:
    if not isinstance(table, dict):
        problems.append(f"[pod] must be a table, got {_type_name(table)}")
        return None
    values = dict(table)
    values.update(_environment_overrides("pod", PodSettings, environ, problems))
    count_before = len(problems)
    pod: PodSettings = _build(PodSettings, values, "pod.", problems)
    if len(problems) > count_before:
        return None

    changes: dict[str, Any] = {}
    if pod.index == -1:
        pod_name = environ.get("POD_NAME", "")
        ordinal = pod_name.rpartition("-")[2]
        if ordinal.isdigit():
            changes["index"] = int(ordinal)
        else:
            problems.append(
                "pod.index: not set, and POD_NAME "
                f"{pod_name!r} does not end in -<ordinal>"
            )
    if "drain_s" not in values:
        changes["drain_s"] = 5 * pod.publish_period_s
    elif pod.drain_s < 0:
        problems.append(
            f"pod.drain_s = {pod.drain_s:g}: must be >= 0, or left out for "
            "5 x publish_period_s"
        )
    if not pod.advertise_address and environ.get("POD_IP"):
        changes["advertise_address"] = str(Address(environ["POD_IP"], pod.port))

    for name in ("namespace", "service"):
        label_problem = dns_label_problem(getattr(pod, name))
        if label_problem is not None:
            problems.append(f"pod.{name} = {getattr(pod, name)!r}: {label_problem}")
    for name in ("app_address", "advertise_address"):
        value = changes.get(name, getattr(pod, name))
        if not value and name == "advertise_address":
            continue
        try:
            parse_address(value)
        except ValueError as exc:
            problems.append(f"pod.{name} = {value!r}: {exc}")
    return dataclasses.replace(pod, **changes)


def _check_environment_names(environ: Mapping[str, str], problems: list[str]) -> None:
    """Reject STATEFUL_ROUTE_ variables that name no key, such as a misspelt one."""
    sections: dict[str, type[Any]] = {**_SECTIONS, "pod": PodSettings}
    known = {
        f"{ENV_PREFIX}{section}_{spec.name}".upper()
        for section, cls in sections.items()
        for spec in dataclasses.fields(cls)
    }
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            problems.append(
                f"environment variable {name}: unknown, expected "
                f"{ENV_PREFIX}<SECTION>_<KEY> of [proxy], [admin], [store], [log] "
                "or [pod]"
            )


def _environment_overrides(
    section: str, cls: type[Any], environ: Mapping[str, str], problems: list[str]
) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        variable = f"{ENV_PREFIX}{section}_{spec.name}".upper()
        if variable not in environ:
            continue
        raw = environ[variable]
        kind = hints[spec.name]
        try:
            overrides[spec.name] = _parse_environment_value(raw, kind)
        except ValueError:
            problems.append(f"{variable}={raw!r}: expected {_expected_name(kind)}")
    return overrides


def _parse_environment_value(raw: str, kind: Any) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    if typing.get_origin(kind) is tuple:
        # A list of strings, such as proxy.trusted_proxies, separated by commas.
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _build(
    cls: type[Any], values: dict[str, Any], prefix: str, problems: list[str]
) -> Any:
    """Type-check `values` against the fields of `cls` and construct it."""
    hints = typing.get_type_hints(cls)
    specs = {spec.name: spec for spec in dataclasses.fields(cls)}
    accepted: dict[str, Any] = {}
    count_before = len(problems)

    for key, value in values.items():
        spec = specs.get(key)
        if spec is None:
            problems.append(f"{prefix}{key}: unknown key")
            continue
        checked = _check_value(f"{prefix}{key}", value, hints[key], spec, problems)
        if checked is not None:
            accepted[key] = checked

    if len(problems) > count_before:
        return None if cls is ServiceSettings else cls()
    return cls(**accepted)


def _check_value(
    key: str,
    value: Any,
    kind: Any,
    spec: dataclasses.Field[Any],
    problems: list[str],
) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typing.get_origin(kind) is tuple:
        item_kind = typing.get_args(kind)[0]
        if not isinstance(value, list) or not all(
            isinstance(v, item_kind) and not isinstance(v, bool) for v in value
        ):
            items = "integers" if item_kind is int else "strings"
            problems.append(f"{key} = {value!r}: expected a list of {items}")
            return None
        return tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        problems.append(
            f"{key} = {value!r}: expected {_expected_name(kind)}, "
            f"got {_type_name(value)}"
        )
        return None

    if kind is float and not math.isfinite(value):
        problems.append(f"{key} = {value!r}: must be a finite number")
        return None
    meta = spec.metadata
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(repr(choice) for choice in meta["choices"])
        problems.append(f"{key} = {value!r}: expected one of {allowed}")
        return None
    if meta.get("low") is not None and value < meta["low"]:
        problems.append(f"{key} = {value!r}: must be >= {meta['low']}")
        return None
    if meta.get("high") is not None and value > meta["high"]:
        problems.append(f"{key} = {value!r}: must be <= {meta['high']}")
        return None
    if meta.get("above") is not None and not value > meta["above"]:
        problems.append(f"{key} = {value!r}: must be > {meta['above']}")
        return None
    return value


def _check_service(
    service: ServiceSettings, proxy: ProxySettings, problems: list[str]
) -> ServiceSettings:
    key = f"services.{service.name}"
    _check_weights(service, problems)
    _check_health(service, problems)
    if service.uses_registry:
        if service.pods or service.address_template or service.replicas:
            problems.append(
                f'[{key}]: discovery = "registry" takes the pods from the store; '
                "remove pods, address_template and replicas"
            )
        for namespace in service.namespaces:
            label_problem = dns_label_problem(namespace)
            if label_problem is not None:
                problems.append(
                    f"{key}.namespaces: namespace {namespace!r} {label_problem}"
                )
        return service
    if service.pods and service.address_template:
        problems.append(f"[{key}]: set either pods or address_template, not both")
        return service
    if not service.pods and not service.address_template:
        problems.append(f"[{key}]: no pods: set pods or address_template")
        return service

    for position, pod in enumerate(service.pods):
        try:
            parse_address(pod)
        except ValueError as exc:
            problems.append(f"{key}.pods[{position}] = {pod!r}: {exc}")

    if service.address_template:
        if service.replicas < 1:
            problems.append(f"{key}.replicas: must be >= 1 with address_template")
        namespaces = service.namespaces or (proxy.default_namespace,)
        for namespace in namespaces:
            label_problem = dns_label_problem(namespace)
            if label_problem is not None:
                problems.append(
                    f"{key}.namespaces: namespace {namespace!r} {label_problem}"
                )
        try:
            parse_address(service.expand_template(namespaces[0], 0))
        except (KeyError, IndexError, ValueError) as exc:
            problems.append(
                f"{key}.address_template = {service.address_template!r}: "
                f"{_template_problem(exc)}"
            )
        service = dataclasses.replace(service, namespaces=namespaces)
    elif service.namespaces:
        problems.append(f"{key}.namespaces: only used with address_template")
    elif service.replicas:
        problems.append(f"{key}.replicas: only used with address_template")
    return service


def _check_weights(service: ServiceSettings, problems: list[str]) -> None:
    if not service.weights:
        return
    key = f"services.{service.name}.weights"
    if service.strategy != "weighted_round_robin":
        problems.append(
            f'{key}: only used with strategy = "weighted_round_robin", '
            f"not {service.strategy!r}"
        )
    if not service.pods:
        problems.append(
            f"{key}: only used with pods, one weight per pod; "
            "a service without pods weighs every pod 1"
        )
    elif len(service.weights) != len(service.pods):
        problems.append(
            f"{key}: {len(service.weights)} weights for {len(service.pods)} pods, "
            "expected one weight per pod"
        )
    for position, weight in enumerate(service.weights):
        if weight < 0:
            problems.append(f"{key}[{position}] = {weight}: must be >= 0")
    if all(weight == 0 for weight in service.weights):
        problems.append(f"{key}: every weight is 0, so no pod takes new users")


def _check_health(service: ServiceSettings, problems: list[str]) -> None:
    key = f"services.{service.name}"
    path = service.health_check_path
    if path and (
        not path.startswith("/")
        or not path.isascii()
        or not path.isprintable()
        or " " in path
    ):
        problems.append(
            f"{key}.health_check_path = {path!r}: expected a path starting with "
            "'/', in printable ASCII without spaces, or \"\" to turn probes off"
        )
    try:
        StatusRanges(service.expected_statuses)
    except ValueError as exc:
        problems.append(f"{key}.expected_statuses: {exc}")
    if service.max_ejection_s < service.base_ejection_s:
        problems.append(
            f"{key}.max_ejection_s = {service.max_ejection_s:g}: must be >= "
            f"base_ejection_s ({service.base_ejection_s:g})"
        )


def _template_problem(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        allowed = ", ".join("{" + name + "}" for name in TEMPLATE_FIELDS)
        return f"unknown field {{{exc.args[0]}}}, expected only {allowed}"
    return f"does not expand to host:port ({exc})"


def _check_redis_url(url: str) -> list[str]:
    """Return the problems of `store.redis_url`, empty when it is usable."""
    cluster = url.startswith(("redis+cluster://", "rediss+cluster://"))
    sentinel = url.startswith(("redis+sentinel://", "rediss+sentinel://"))
    if cluster or sentinel:
        # Imported here so that loading a config does not import redis-py.
        from proxy.store.redis import parse_cluster_url, parse_sentinel_url

        try:
            if cluster:
                parse_cluster_url(url)
            else:
                parse_sentinel_url(url)
        except ValueError as error:
            return [f"store.redis_url: {error}"]
        return []
    if not url.startswith(("redis://", "rediss://", "unix://")):
        scheme, separator, _ = url.partition("://")
        found = f"the scheme {scheme!r}" if separator else "no scheme"
        return [
            "store.redis_url: expected a redis://, rediss://, unix://, "
            "redis+cluster://, rediss+cluster://, redis+sentinel:// or "
            f"rediss+sentinel:// URL, got {found}"
        ]
    # redis-py parses the URL only when the store starts, where a bad port
    # or option would end the process with a traceback.
    from redis.asyncio.connection import parse_url

    from proxy.store.redis import mask_password

    try:
        parse_url(url)
    except ValueError as error:
        return [f"store.redis_url: invalid Redis URL {mask_password(url)!r}: {error}"]
    return []


def _workers_problems(
    proxy: ProxySettings,
    admin: AdminSettings,
    store: StoreSettings,
    pod: PodSettings | None,
) -> list[str]:
    """Return the problems of running `proxy.workers` > 1 processes."""
    workers = proxy.workers
    problems = []
    if store.backend == "memory":
        problems.append(
            f'proxy.workers = {workers}: needs store.backend = "redis", because '
            "each worker has its own memory store and the same user would get "
            "a different pod in each"
        )
    if proxy.port == 0:
        problems.append(
            f"proxy.workers = {workers}: needs a fixed proxy.port, because with "
            "port 0 each worker would get a port of its own"
        )
    if pod is not None:
        problems.append(
            f"proxy.workers = {workers}: not supported with a [pod] section, "
            "because one process publishes and drains the pod; use 1"
        )
    last_admin_port = admin.port + workers - 1
    if admin.enabled and admin.port and last_admin_port > 65535:
        problems.append(
            f"proxy.workers = {workers}: worker i serves the admin API on "
            f"admin.port + i, and {last_admin_port} is above 65535"
        )
    if admin.enabled and 0 < admin.port < proxy.port <= last_admin_port:
        problems.append(
            f"proxy.workers = {workers}: worker i serves the admin API on "
            f"admin.port + i, so worker {proxy.port - admin.port} would serve it "
            f"on proxy.port {proxy.port}"
        )
    return problems


def _check_cross_section(
    sections: dict[str, Any],
    services: dict[str, ServiceSettings],
    pod: PodSettings | None,
    declared: bool,
    problems: list[str],
) -> None:
    """Check what spans sections.

    `declared` is whether the document has a service or pod section, valid
    or not, so a broken one does not also report "no services".
    """
    proxy: ProxySettings = sections["proxy"]
    store: StoreSettings = sections["store"]
    admin: AdminSettings = sections["admin"]

    label_problem = dns_label_problem(proxy.default_namespace)
    if label_problem is not None:
        problems.append(
            f"proxy.default_namespace = {proxy.default_namespace!r}: {label_problem}"
        )
    routing_headers: dict[str, str] = {}
    for name in (
        "namespace_header",
        "uid_header",
        "service_header",
        "routed_pod_header",
    ):
        value = getattr(proxy, name)
        if not value and name == "routed_pod_header":
            continue
        if _HEADER_NAME_RE.fullmatch(value) is None:
            problems.append(
                f"proxy.{name} = {value!r}: expected an HTTP header name "
                "(letters, digits and !#$%&'*+-.^_`|~, no spaces or colon)"
            )
        elif name != "routed_pod_header":
            other = routing_headers.setdefault(value.lower(), name)
            if other != name:
                problems.append(
                    f"proxy.{name} = {value!r}: the same header as proxy.{other}"
                )
    if pod is not None:
        _check_networks("pod.trusted_proxies", pod.trusted_proxies, problems)
        listeners = {"admin.port": admin.port if admin.enabled else 0}
        if services:
            listeners["proxy.port"] = proxy.port
        for key, port in listeners.items():
            if port and port == pod.port:
                problems.append(f"pod.port = {pod.port}: the same port as {key}")
    # Without a [pod] section, `declared` means service sections, valid or
    # not, so a broken service does not hide this problem.
    opens_proxy_port = bool(services) or (declared and pod is None)
    if opens_proxy_port and admin.enabled and admin.port == proxy.port != 0:
        problems.append(f"admin.port = {admin.port}: the same port as proxy.port")
    _check_request_limits(proxy, problems)
    if store.local_cache_ttl_s >= store.temporary_link_ttl_s:
        problems.append(
            f"store.local_cache_ttl_s = {store.local_cache_ttl_s:g}: must be "
            f"shorter than store.temporary_link_ttl_s "
            f"({store.temporary_link_ttl_s:g}), or a cached pod outlives its link"
        )
    if store.backend == "redis":
        problems.extend(_check_redis_url(store.redis_url))
    if proxy.workers > 1:
        problems.extend(_workers_problems(proxy, admin, store, pod))
    if not declared:
        problems.append(
            "no services: add at least one [services.NAME] section or a [pod] section"
        )


def _check_networks(key: str, cidrs: tuple[str, ...], problems: list[str]) -> None:
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            problems.append(
                f"{key}: {cidr!r} is not an IP address or CIDR "
                "network such as 10.0.0.0/8"
            )


def _check_request_limits(proxy: ProxySettings, problems: list[str]) -> None:
    _check_networks("proxy.trusted_proxies", proxy.trusted_proxies, problems)
    for name in ("max_request_line_bytes", "max_header_field_bytes"):
        if getattr(proxy, name) > proxy.max_header_bytes:
            problems.append(
                f"proxy.{name} = {getattr(proxy, name)}: must be <= "
                f"proxy.max_header_bytes ({proxy.max_header_bytes})"
            )


def _expected_name(kind: Any) -> str:
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }
    return names.get(kind, str(kind))


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "a table"})
    return names.get(type(value), type(value).__name__)
