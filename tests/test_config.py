from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import load_config, parse_config
from proxy.errors import ConfigError
from proxy.pods import Address

ROOT = Path(__file__).resolve().parent.parent


def minimal(**sections: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "services": {"game": {"pods": ["127.0.0.1:9001", "127.0.0.1:9002"]}}
    }
    document.update(sections)
    return document


def problems_of(
    document: dict[str, Any], environ: dict[str, str] | None = None
) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, environ=environ or {})
    return caught.value.problems


def test_example_config_is_valid() -> None:
    config = load_config(ROOT / "config.toml", environ={})

    assert config.proxy.port == 8080
    assert config.store.backend == "memory"
    assert "game" in config.services


def test_defaults_match_documented_values() -> None:
    config = parse_config(minimal(), environ={})

    assert config.proxy.namespace_header == "X-Namespace"
    assert config.proxy.uid_header == "X-Uid"
    assert config.proxy.service_header == "X-Service"
    assert config.proxy.routed_pod_header == "X-Routed-Pod"
    assert config.proxy.default_namespace == "default"
    assert config.admin.host == "127.0.0.1"
    assert config.store.temporary_link_ttl_s == 300
    assert config.store.local_cache_ttl_s == 240
    assert config.services["game"].strategy == "round_robin"
    assert config.services["game"].allow_without_uid is False


def test_pod_index_is_list_position() -> None:
    config = parse_config(minimal(), environ={})

    addresses = config.services["game"].addresses("default")

    assert addresses == (Address("127.0.0.1", 9001), Address("127.0.0.1", 9002))


def test_unknown_key_is_named() -> None:
    problems = problems_of(minimal(proxy={"prot": 8080}))

    assert problems == ["proxy.prot: unknown key"]


def test_every_problem_is_reported() -> None:
    document = minimal(
        proxy={"port": "eighty"},
        store={"temporary_link_ttl_s": -5, "backend": "etcd"},
        admin={"port": 70000},
        extra={},
    )

    problems = problems_of(document)

    assert any(
        p.startswith("proxy.port = 'eighty': expected an integer") for p in problems
    )
    assert any(p.startswith("store.temporary_link_ttl_s = -5") for p in problems)
    assert any(
        p.startswith("store.backend = 'etcd': expected one of") for p in problems
    )
    assert any(p.startswith("admin.port = 70000: must be <= 65535") for p in problems)
    assert "unknown section [extra]" in problems
    assert len(problems) == 5


def test_boolean_is_not_an_integer() -> None:
    problems = problems_of(minimal(proxy={"port": True}))

    assert problems == ["proxy.port = True: expected an integer, got a boolean"]


def test_integer_is_accepted_as_float() -> None:
    config = parse_config(minimal(proxy={"shutdown_timeout_s": 3}), environ={})

    assert config.proxy.shutdown_timeout_s == 3.0


def test_invalid_pod_address_is_named() -> None:
    document = {"services": {"game": {"pods": ["127.0.0.1:9001", "no-port"]}}}

    problems = problems_of(document)

    assert problems == ["services.game.pods[1] = 'no-port': expected host:port"]


def test_service_needs_pods_or_template() -> None:
    problems = problems_of({"services": {"game": {}}})

    assert problems == ["[services.game]: no pods: set pods or address_template"]


def test_service_name_must_be_dns_label() -> None:
    problems = problems_of({"services": {"Game_1": {"pods": ["127.0.0.1:1"]}}})

    assert len(problems) == 1
    assert problems[0].startswith("[services.Game_1]: service name 'Game_1'")


def test_template_expands_per_namespace() -> None:
    document = {
        "services": {
            "chat": {
                "address_template": "{service}-{index}.{service}.{namespace}.svc:8080",
                "replicas": 2,
                "namespaces": ["eu", "us"],
            }
        }
    }
    service = parse_config(document, environ={}).services["chat"]

    assert service.addresses("eu") == (
        Address("chat-0.chat.eu.svc", 8080),
        Address("chat-1.chat.eu.svc", 8080),
    )
    assert service.addresses("asia") is None


def test_template_defaults_to_default_namespace() -> None:
    document = {
        "services": {"chat": {"address_template": "chat-{index}:80", "replicas": 1}}
    }

    service = parse_config(document, environ={}).services["chat"]

    assert service.namespaces == ("default",)


def test_template_with_unknown_field_is_rejected() -> None:
    document = {"services": {"chat": {"address_template": "{pod}:80", "replicas": 1}}}

    problems = problems_of(document)

    assert len(problems) == 1
    assert "unknown field {pod}" in problems[0]


def test_cache_must_be_shorter_than_link() -> None:
    problems = problems_of(
        minimal(store={"temporary_link_ttl_s": 100, "local_cache_ttl_s": 100})
    )

    assert len(problems) == 1
    assert problems[0].startswith("store.local_cache_ttl_s = 100: must be shorter")


def test_default_service_must_exist() -> None:
    problems = problems_of(minimal(proxy={"default_service": "chat"}))

    assert problems == [
        "proxy.default_service = 'chat': no [services] section with that name"
    ]


def test_default_service_broken_reports_once() -> None:
    document = minimal(proxy={"default_service": "game"})
    document["services"]["game"]["strategy"] = "fastest"

    problems = problems_of(document)

    assert len(problems) == 1
    assert problems[0].startswith("services.game.strategy = 'fastest': expected")


def test_no_services_is_rejected() -> None:
    problems = problems_of({})

    assert problems == [
        "no services: add at least one [services.NAME] section or a [pod] section"
    ]


def test_environment_overrides_file() -> None:
    environ = {
        "STATEFUL_ROUTE_STORE_BACKEND": "redis",
        "STATEFUL_ROUTE_STORE_REDIS_URL": "redis://10.0.0.1:6380/2",
        "STATEFUL_ROUTE_PROXY_PORT": "9090",
        "STATEFUL_ROUTE_ADMIN_ENABLED": "false",
    }

    config = parse_config(minimal(proxy={"port": 8080}), environ=environ)

    assert config.store.backend == "redis"
    assert config.store.redis_url == "redis://10.0.0.1:6380/2"
    assert config.proxy.port == 9090
    assert config.admin.enabled is False


def test_redis_idle_trim_settings() -> None:
    defaults = parse_config(minimal(), environ={}).store
    environ = {
        "STATEFUL_ROUTE_STORE_REDIS_IDLE_TIMEOUT_S": "0",
        "STATEFUL_ROUTE_STORE_REDIS_MIN_IDLE_CONNECTIONS": "16",
    }
    overridden = parse_config(minimal(), environ=environ).store
    problems = problems_of(
        minimal(store={"redis_idle_timeout_s": -1, "redis_min_idle_connections": -1})
    )

    assert defaults.redis_idle_timeout_s == 30
    assert defaults.redis_min_idle_connections == 4
    assert overridden.redis_idle_timeout_s == 0
    assert overridden.redis_min_idle_connections == 16
    assert "store.redis_idle_timeout_s = -1.0: must be >= 0" in problems
    assert "store.redis_min_idle_connections = -1: must be >= 0" in problems


def test_invalid_environment_value_is_named() -> None:
    problems = problems_of(minimal(), environ={"STATEFUL_ROUTE_PROXY_PORT": "high"})

    assert problems == ["STATEFUL_ROUTE_PROXY_PORT='high': expected an integer"]


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.toml", environ={})

    assert caught.value.problems[0].startswith("file not found")


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[proxy\nport = 1\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})

    assert caught.value.problems[0].startswith("invalid TOML")


def test_config_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        parse_config({}, environ={})


def test_pod_index_comes_from_pod_name() -> None:
    document = {"pod": {"service": "game", "app_address": "127.0.0.1:8081"}}

    config = parse_config(document, environ={"POD_NAME": "game-server-7"})

    assert config.pod is not None
    assert config.pod.index == 7
    assert config.services == {}


def test_pod_without_index_or_pod_name_is_rejected() -> None:
    document = {"pod": {"service": "game", "app_address": "127.0.0.1:8081"}}

    problems = problems_of(document, environ={"POD_NAME": "game-server"})

    assert problems == [
        "pod.index: not set, and POD_NAME 'game-server' does not end in -<ordinal>"
    ]


def test_pod_drain_defaults_to_five_periods() -> None:
    document = {
        "pod": {
            "service": "game",
            "index": 0,
            "app_address": "127.0.0.1:8081",
            "publish_period_s": 2,
        }
    }

    config = parse_config(document, environ={})

    assert config.pod is not None
    assert config.pod.drain_s == 10.0


def test_pod_advertises_pod_ip() -> None:
    document = {"pod": {"service": "game", "index": 1, "app_address": "127.0.0.1:1"}}

    config = parse_config(document, environ={"POD_IP": "10.1.2.3"})

    assert config.pod is not None
    assert config.pod.advertise_address == "10.1.2.3:8000"


def test_registry_service_takes_no_pod_list() -> None:
    document = {
        "services": {"game": {"discovery": "registry", "pods": ["127.0.0.1:1"]}}
    }

    problems = problems_of(document)

    assert len(problems) == 1
    assert "takes the pods from the store" in problems[0]


def test_pod_state_settings_have_defaults() -> None:
    service = parse_config(minimal(), environ={}).services["game"]

    assert service.discovery == "static"
    assert service.require_pod_state is False
    assert service.state_stale_after_s == 60
    assert service.state_refresh_s == 2
    assert service.load_range == 500


PODS = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]


def weight_problems_of(service: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"services": {"game": service}}, environ={})
    return caught.value.problems


def test_weights_accepted_with_weighted_strategy() -> None:
    config = parse_config(
        {
            "services": {
                "game": {
                    "pods": PODS,
                    "strategy": "weighted_round_robin",
                    "weights": [5, 1, 1],
                }
            }
        },
        environ={},
    )

    assert config.services["game"].weights == (5, 1, 1)


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ({"weights": [5, 1]}, "services.game.weights: 2 weights for 3 pods"),
        ({"weights": [1, -1, 1]}, "services.game.weights[1] = -1: must be >= 0"),
        ({"weights": [0, 0, 0]}, "services.game.weights: every weight is 0"),
        ({"weights": [1, "a", 1]}, "expected a list of integers"),
        ({"weights": [True, 1, 1]}, "expected a list of integers"),
        (
            {"weights": [1, 1, 1], "strategy": "round_robin"},
            'only used with strategy = "weighted_round_robin"',
        ),
    ],
)
def test_invalid_weights_rejected(service: dict[str, object], expected: str) -> None:
    table = {"pods": PODS, "strategy": "weighted_round_robin", **service}

    assert any(expected in problem for problem in weight_problems_of(table))


def test_weights_need_pods() -> None:
    table = {
        "address_template": "game-{index}:80",
        "replicas": 2,
        "strategy": "weighted_round_robin",
        "weights": [1, 1],
    }

    assert any(
        "only used with pods" in problem for problem in weight_problems_of(table)
    )


def test_load_factor_must_exceed_one() -> None:
    problems = weight_problems_of({"pods": PODS, "load_factor": 1.0})

    assert "services.game.load_factor = 1.0: must be > 1" in problems


def test_ewma_decay_must_be_positive() -> None:
    problems = weight_problems_of({"pods": PODS, "ewma_decay_s": 0})

    assert "services.game.ewma_decay_s = 0.0: must be > 0" in problems


def test_health_settings_have_defaults() -> None:
    service = parse_config(minimal(), environ={}).services["game"]

    assert service.health_check_path == ""
    assert service.health_interval_s == 5
    assert service.health_timeout_s == 2
    assert service.unhealthy_threshold == 3
    assert service.healthy_threshold == 2
    assert service.expected_statuses == ("200-399",)
    assert service.consecutive_failures == 5
    assert service.base_ejection_s == 30
    assert service.max_ejection_s == 300
    assert service.max_ejection_percent == 50
    assert service.slow_start_s == 30
    assert service.history_size == 100


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"health_check_path": "healthz"}, "health_check_path = 'healthz'"),
        ({"health_check_path": "/a b"}, "expected a path starting with '/'"),
        ({"expected_statuses": ["2xx"]}, "invalid status entry '2xx'"),
        ({"expected_statuses": []}, "expected_statuses: no statuses"),
        ({"max_ejection_percent": 101}, "max_ejection_percent = 101: must be <="),
        ({"unhealthy_threshold": 0}, "unhealthy_threshold = 0: must be >= 1"),
        (
            {"base_ejection_s": 60.0, "max_ejection_s": 30.0},
            "max_ejection_s = 30: must be >= base_ejection_s (60)",
        ),
    ],
)
def test_invalid_health_settings_rejected(
    settings: dict[str, object], expected: str
) -> None:
    problems = weight_problems_of({"pods": PODS, **settings})

    assert any(expected in problem for problem in problems), problems


def test_unknown_environment_variable_is_named() -> None:
    environ = {"STATEFUL_ROUTE_POD_ADVERTISE": "10.0.0.1:8000"}

    problems = problems_of(minimal(), environ=environ)

    assert any(
        p.startswith("environment variable STATEFUL_ROUTE_POD_ADVERTISE: unknown")
        for p in problems
    )


def test_bad_service_key_hides_no_service() -> None:
    problems = problems_of({"services": {"game": {"pods": ["127.0.0.1:1"], "x": 1}}})

    assert problems == ["services.game.x: unknown key"]


@pytest.mark.parametrize("header", ["X Uid", "X-Uid:", "", "Ünï"])
def test_invalid_header_name_is_rejected(header: str) -> None:
    problems = problems_of(minimal(proxy={"uid_header": header}))

    assert len(problems) == 1
    assert problems[0].startswith(f"proxy.uid_header = {header!r}: expected an HTTP")


def test_routing_headers_must_differ() -> None:
    problems = problems_of(minimal(proxy={"service_header": "x-uid"}))

    assert problems == [
        "proxy.service_header = 'x-uid': the same header as proxy.uid_header"
    ]


def test_infinite_timeout_is_rejected() -> None:
    problems = problems_of(minimal(proxy={"shutdown_timeout_s": float("inf")}))

    assert problems == ["proxy.shutdown_timeout_s = inf: must be a finite number"]


def test_pod_port_must_differ_from_proxy_port() -> None:
    document = minimal(
        proxy={"port": 8000},
        pod={"service": "game", "index": 0, "app_address": "127.0.0.1:1"},
    )

    problems = problems_of(document)

    assert problems == ["pod.port = 8000: the same port as proxy.port"]


def test_admin_port_must_differ_from_proxy_port() -> None:
    problems = problems_of(minimal(proxy={"port": 9000}, admin={"port": 9000}))

    assert problems == ["admin.port = 9000: the same port as proxy.port"]


def test_worker_admin_port_on_proxy_port() -> None:
    document = minimal(
        proxy={"port": 9002, "workers": 3},
        admin={"port": 9000},
        store={"backend": "redis"},
    )

    problems = problems_of(document)

    assert problems == [
        "proxy.workers = 3: worker i serves the admin API on admin.port + i, "
        "so worker 2 would serve it on proxy.port 9002"
    ]


def test_worker_admin_ports_below_proxy_port() -> None:
    document = minimal(
        proxy={"port": 9003, "workers": 3},
        admin={"port": 9000},
        store={"backend": "redis"},
    )

    config = parse_config(document, environ={})

    assert config.proxy.workers == 3


def test_admin_port_checked_beside_broken_service() -> None:
    document = minimal(proxy={"port": 9000}, admin={"port": 9000})
    document["services"]["game"]["colour"] = "blue"

    problems = problems_of(document)

    assert problems == [
        "services.game.colour: unknown key",
        "admin.port = 9000: the same port as proxy.port",
    ]


def test_request_limit_defaults_fit_large_heads() -> None:
    proxy = parse_config(minimal(), environ={}).proxy

    assert proxy.max_header_bytes >= 32 * 1024
    assert proxy.max_header_field_bytes >= 32 * 1024
    assert proxy.max_body_bytes >= 100 * 1024 * 1024
    assert proxy.trusted_proxies == ()


def test_invalid_trusted_proxy_is_named() -> None:
    document = minimal(proxy={"trusted_proxies": ["10.0.0.0/8", "10.0.0.300"]})

    problems = problems_of(document)

    assert problems == [
        "proxy.trusted_proxies: '10.0.0.300' is not an IP address or CIDR "
        "network such as 10.0.0.0/8"
    ]


def test_trusted_proxies_from_environment() -> None:
    environ = {"STATEFUL_ROUTE_PROXY_TRUSTED_PROXIES": "10.0.0.0/8, fd00::/8"}

    config = parse_config(minimal(), environ=environ)

    assert config.proxy.trusted_proxies == ("10.0.0.0/8", "fd00::/8")


def test_header_line_limit_within_head_limit() -> None:
    document = minimal(proxy={"max_header_bytes": 4096, "max_header_field_bytes": 8192})

    problems = problems_of(document)

    assert problems == [
        "proxy.max_request_line_bytes = 16384: must be <= proxy.max_header_bytes "
        "(4096)",
        "proxy.max_header_field_bytes = 8192: must be <= proxy.max_header_bytes (4096)",
    ]


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("redis://:secret@127.0.0.1:port/0", "could not be cast to integer"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "'socket_timeout'"),
        ("unix:///run/redis.sock?db=first", "'db'"),
    ],
)
def test_unusable_redis_url_is_named(url: str, named: str) -> None:
    document = minimal(store={"backend": "redis", "redis_url": url})

    problems = problems_of(document)

    assert len(problems) == 1
    assert problems[0].startswith("store.redis_url: invalid Redis URL")
    assert named in problems[0]
    assert "secret" not in problems[0]
