"""The deployment files: the Dockerfile, the Kubernetes sample and compose.yaml.

No container can run here, so the files are parsed instead. Every sidecar
container is checked against the real command line parser, the real
configuration loader and the real admin routes: its arguments, the
``STATEFUL_ROUTE_*`` variables it sets, its embedded ``config.toml``, its
ports, its probes and its stop timing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import tomllib
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from proxy.admin import build_admin_app
from proxy.cli import build_parser
from proxy.cli import main as cli_main
from proxy.config import (
    ENV_PREFIX,
    AdminSettings,
    Config,
    PodSettings,
    ProxySettings,
    parse_config,
)
from proxy.errors import ConfigError
from proxy.pods import parse_address
from proxy.server import ProxyServer
from proxy.store.memory import MemoryStore

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_FILE = DEPLOY / "compose.yaml"
SIDECAR_IMAGE = "stateful-route"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

# Values the kubelet or the shell would provide, for the environment of a
# container: the downward API, Secrets and ${VAR} in compose.yaml.
SAMPLE_POD_IP = "10.0.0.7"
SAMPLE_NAMESPACE = "default"
SAMPLE_TOKEN = "sample-admin-token"
SAMPLE_SHELL_ENV = {"STATEFUL_ROUTE_ADMIN_TOKEN": SAMPLE_TOKEN}

Document = dict[str, Any]


# The Dockerfile.


@dataclass
class Stage:
    """One ``FROM`` stage of a Dockerfile with its instructions in order."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [value for name, value in self.instructions if name == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Return the stages of a Dockerfile, with ``ARG`` defaults put in ``FROM``."""
    logical_lines: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical_lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"

    arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines:
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword == "FROM":
            base = re.sub(
                r"\$\{(\w+)\}", lambda match: arguments[match.group(1)], value
            )
            stages.append(Stage(base.split()[0]))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            name, _, default = value.partition("=")
            arguments[name] = default
        else:
            stages[-1].instructions.append((keyword, value))
    return stages


@cache
def dockerfile_stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage() -> Stage:
    return dockerfile_stages()[-1]


def exec_form(stage: Stage, keyword: str) -> list[str]:
    values = stage.values(keyword)
    assert values, f"the final stage has no {keyword}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"{keyword} is not in exec form (a JSON list)"
    return [str(item) for item in parsed]


def image_entrypoint() -> list[str]:
    return exec_form(final_stage(), "ENTRYPOINT")


def image_cmd() -> list[str]:
    return exec_form(final_stage(), "CMD")


def image_user() -> str:
    users = final_stage().values("USER")
    assert users, "the final stage has no USER, so the image runs as root"
    return users[-1].partition(":")[0]


def test_dockerfile_runs_as_non_root() -> None:
    user = image_user()
    assert user not in ("root", "0")
    # runAsNonRoot in Kubernetes can only verify a numeric user.
    assert user.isdigit(), f"USER {user!r} is not numeric"


def test_dockerfile_entrypoint_is_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert image_entrypoint() == [SIDECAR_IMAGE]
    assert SIDECAR_IMAGE in scripts


def test_dockerfile_cmd_parses_with_cli() -> None:
    arguments = parse_cli(image_entrypoint() + image_cmd())
    assert arguments.command == "run"


def test_dockerfile_base_tag_is_pinned() -> None:
    for stage in dockerfile_stages():
        image = stage.base.partition("@")[0].rpartition("/")[2]
        tag = image.partition(":")[2]
        assert tag, f"FROM {stage.base}: no tag"
        assert tag != "latest", f"FROM {stage.base}: the tag moves"


def test_dockerfile_exposes_default_ports() -> None:
    exposed = {
        int(port.partition("/")[0])
        for value in final_stage().values("EXPOSE")
        for port in value.split()
    }
    defaults = {
        ProxySettings().port,
        PodSettings().port,
        AdminSettings().port,
    }
    assert exposed == defaults


def test_dockerfile_copies_existing_files() -> None:
    ignore_lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:].strip() for line in ignore_lines if line.startswith("!")}
    copies = [
        value
        for stage in dockerfile_stages()
        for value in stage.values("COPY")
        if not value.startswith("--from")
    ]
    assert copies
    for value in copies:
        sources = value.split()[:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source in included, (
                f"COPY {source}: excluded by Dockerfile.dockerignore"
            )


# The command line and the configuration.


def parse_cli(argv: list[str]) -> Any:
    """Parse a container's argv with the real parser, failing on a bad argument."""
    assert argv, "the container has no command"
    assert argv[0] == SIDECAR_IMAGE, f"runs {argv[0]!r}, not {SIDECAR_IMAGE!r}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"stateful-route rejects the arguments {argv[1:]}")


@cache
def override_names() -> frozenset[str]:
    """Return every ``STATEFUL_ROUTE_<SECTION>_<KEY>`` that `parse_config` reads.

    Derived from the `Config` dataclass: each field typed as a section
    dataclass, alone or or-ed with None, contributes its scalar keys.
    """
    names = set()
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        kind = hints[section.name]
        candidates = [kind]
        if typing.get_origin(kind) in (types.UnionType, typing.Union):
            candidates = list(typing.get_args(kind))
        for cls in candidates:
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                continue
            key_hints = typing.get_type_hints(cls)
            for key in dataclasses.fields(cls):
                if key_hints[key.name] in (bool, int, float, str):
                    names.add(f"{ENV_PREFIX}{section.name}_{key.name}".upper())
    return frozenset(names)


def test_override_names_derived() -> None:
    names = override_names()
    assert "STATEFUL_ROUTE_STORE_REDIS_URL" in names
    assert "STATEFUL_ROUTE_ADMIN_TOKEN" in names
    assert "STATEFUL_ROUTE_POD_ADVERTISE_ADDRESS" in names
    assert not any(name.startswith("STATEFUL_ROUTE_SERVICES_") for name in names)


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def listeners(config: Config) -> dict[str, tuple[str, int]]:
    """Return the ports a configuration opens, by role, as (host, port)."""
    ports = {}
    if config.services:
        ports["proxy"] = (config.proxy.host, config.proxy.port)
    if config.pod is not None:
        ports["inbound"] = (config.pod.host, config.pod.port)
    if config.admin.enabled:
        ports["admin"] = (config.admin.host, config.admin.port)
    return ports


def reachable_ports(config: Config) -> set[int]:
    """Return the ports a configuration opens on an address other than loopback."""
    return {port for host, port in listeners(config).values() if not is_loopback(host)}


def stop_time_s(config: Config) -> float:
    """Return the longest time a pod-side sidecar takes to stop after SIGTERM."""
    assert config.pod is not None
    return config.pod.drain_s + config.proxy.shutdown_timeout_s


# One sidecar container, from either Kubernetes or compose.


@dataclass
class Sidecar:
    """A container of the sidecar image with everything it was configured with."""

    name: str
    argv: list[str]
    environ: dict[str, str]
    # Variables set from a Secret (Kubernetes) or from the shell (compose).
    secret_variables: set[str]
    config_text: str
    config_source: str
    # Declared container ports by port name (Kubernetes) or by the entry of
    # ``ports`` or ``expose`` (compose).
    ports: dict[str, int]
    grace_period_s: float
    # Contents of the files mounted into the other containers of the pod.
    app_files: list[str]
    # Kubernetes only: the container, its pod spec and the workload kind.
    container: Document = field(default_factory=dict)
    pod_spec: Document = field(default_factory=dict)
    workload_kind: str = ""
    # Compose only: the service.
    service: Document = field(default_factory=dict)

    def config(self) -> Config:
        document = tomllib.loads(self.config_text)
        try:
            return parse_config(
                document, environ=self.environ, source=self.config_source
            )
        except ConfigError as exc:
            pytest.fail("\n".join([f"{self.config_source}:", *exc.problems]))


def is_sidecar_image(image: str) -> bool:
    name = image.partition("@")[0].rpartition("/")[2].partition(":")[0]
    return name == SIDECAR_IMAGE


# Kubernetes.


@cache
def kubernetes_objects() -> list[Document]:
    objects = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                document["__file__"] = path.name
                objects.append(document)
    return objects


def objects_of_kind(kind: str) -> list[Document]:
    return [item for item in kubernetes_objects() if item["kind"] == kind]


def find_object(kind: str, name: str) -> Document:
    for item in objects_of_kind(kind):
        if item["metadata"]["name"] == name:
            return item
    pytest.fail(f"no {kind} named {name!r} in {KUBERNETES.name}/")


def workloads() -> list[Document]:
    return [
        item
        for item in kubernetes_objects()
        if item["kind"] in ("Deployment", "StatefulSet")
    ]


def sample_pod_name(workload: Document) -> str:
    name = str(workload["metadata"]["name"])
    if workload["kind"] == "StatefulSet":
        return f"{name}-0"
    return f"{name}-7d4b9c8f6-x2x9q"


def kubernetes_environ(
    container: Document, workload: Document
) -> tuple[dict[str, str], set[str]]:
    """Return the container's environment as the kubelet would set it.

    Also returns the names of the variables that come from a Secret.
    """
    assert "envFrom" not in container, "envFrom is not checked by these tests"
    field_values = {
        "metadata.name": sample_pod_name(workload),
        "metadata.namespace": SAMPLE_NAMESPACE,
        "status.podIP": SAMPLE_POD_IP,
    }
    environ: dict[str, str] = {}
    secrets: set[str] = set()
    for variable in container.get("env", []):
        name = variable["name"]
        if "value" in variable:
            environ[name] = str(variable["value"])
            continue
        source = variable["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            assert path in field_values, f"{name}: fieldPath {path} is not checked"
            environ[name] = field_values[path]
        elif "secretKeyRef" in source:
            environ[name] = SAMPLE_TOKEN
            secrets.add(name)
        else:
            pytest.fail(f"{name}: valueFrom {sorted(source)} is not checked")
    return environ, secrets


def kubernetes_argv(container: Document) -> list[str]:
    """Return the argv of a container: command and args over the image's."""
    command = container.get("command")
    args = container.get("args")
    if command is not None:
        return [str(item) for item in command + (args or [])]
    return image_entrypoint() + ([str(item) for item in args] if args else image_cmd())


def mounted_configmap_file(pod_spec: Document, container: Document, path: str) -> str:
    """Return the content of the ConfigMap key mounted at `path` in `container`."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        mount_path = mount["mountPath"].rstrip("/")
        if "subPath" in mount:
            if path != mount_path:
                continue
            relative = mount["subPath"]
        elif path.startswith(mount_path + "/"):
            relative = path[len(mount_path) + 1 :]
        else:
            continue
        volume = volumes[mount["name"]]
        assert "configMap" in volume, f"{path} is mounted from {sorted(volume)}"
        source = volume["configMap"]
        key = relative
        for item in source.get("items", []):
            if item["path"] == relative:
                key = item["key"]
        configmap = find_object("ConfigMap", source["name"])
        assert key in configmap["data"], (
            f"ConfigMap {source['name']} has no key {key!r} for {path}"
        )
        return str(configmap["data"][key])
    pytest.fail(f"{container['name']}: nothing is mounted at {path}")


def mounted_configmap_texts(pod_spec: Document, container: Document) -> list[str]:
    """Return every ConfigMap value mounted into `container`."""
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    texts = []
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap")
        if source is not None:
            texts.extend(find_object("ConfigMap", source["name"])["data"].values())
    return texts


def kubernetes_sidecar(workload_name: str, container_name: str) -> Sidecar:
    """Return a sidecar container of a workload, with its config and ports."""
    workload = next(
        item for item in workloads() if item["metadata"]["name"] == workload_name
    )
    pod_spec = workload["spec"]["template"]["spec"]
    container = next(
        item for item in pod_spec["containers"] if item["name"] == container_name
    )
    argv = kubernetes_argv(container)
    environ, secrets = kubernetes_environ(container, workload)
    config_path = str(parse_cli(argv).config)
    name = f"{workload_name}/{container_name}"
    others = [item for item in pod_spec["containers"] if item is not container]
    return Sidecar(
        name=name,
        argv=argv,
        environ=environ,
        secret_variables=secrets,
        config_text=mounted_configmap_file(pod_spec, container, config_path),
        config_source=f"{workload['__file__']}: {name}",
        ports={
            port.get("name", str(port["containerPort"])): port["containerPort"]
            for port in container.get("ports", [])
        },
        grace_period_s=pod_spec.get("terminationGracePeriodSeconds", 30),
        app_files=[
            text
            for other in others
            for text in mounted_configmap_texts(pod_spec, other)
        ],
        container=container,
        pod_spec=pod_spec,
        workload_kind=workload["kind"],
    )


# Compose.


@cache
def compose_document() -> Document:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def compose_services() -> dict[str, Document]:
    return dict(compose_document()["services"])


def interpolate(value: str) -> str:
    """Replace ``${VAR}``, ``${VAR:?message}`` and ``${VAR:-default}``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in SAMPLE_SHELL_ENV, f"${{{name}}} has no sample value"
        return SAMPLE_SHELL_ENV[name]

    return re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", replace, value)


def compose_environ(service: Document) -> tuple[dict[str, str], set[str]]:
    """Return a service's environment and the variables taken from the shell."""
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    environ = {}
    from_shell = set()
    for name, value in environment.items():
        environ[name] = interpolate(str(value))
        if "${" in str(value):
            from_shell.add(name)
    return environ, from_shell


def compose_argv(service: Document) -> list[str]:
    """Return a service's argv: entrypoint and command over the image's."""

    def split(value: Any) -> list[str]:
        if isinstance(value, str):
            return shlex.split(value)
        return [str(item) for item in value]

    if "entrypoint" in service:
        # A new entrypoint also drops the image's CMD.
        return split(service["entrypoint"]) + split(service.get("command", []))
    command = split(service["command"]) if "command" in service else image_cmd()
    return image_entrypoint() + command


def compose_volumes(service: Document) -> dict[str, Path]:
    """Return the bind mounts of a service: host file by container path."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        mounts[target] = (DEPLOY / source).resolve()
    return mounts


def compose_duration_s(text: str) -> float:
    total = 0.0
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|h|m|s)", text)
    assert "".join(number + unit for number, unit in parts) == text, text
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def compose_ports(service: Document) -> dict[str, int]:
    """Return the container port of each entry of ``ports`` and ``expose``."""
    ports = {}
    for entry in service.get("ports", []):
        text = str(entry).partition("/")[0]
        ports[str(entry)] = int(text.rpartition(":")[2])
    for entry in service.get("expose", []):
        ports[str(entry)] = int(str(entry).partition("/")[0])
    return ports


def compose_sidecar(name: str) -> Sidecar:
    """Return a compose service of the sidecar image, with its config and ports."""
    services = compose_services()
    service = services[name]
    argv = compose_argv(service)
    environ, from_shell = compose_environ(service)
    config_path = str(parse_cli(argv).config)
    mounts = compose_volumes(service)
    assert config_path in mounts, f"{name}: nothing is mounted at {config_path}"
    # A sidecar that shares the network of its app, as in a pod, is reached
    # at the ports that the app's service exposes.
    ports = compose_ports(service)
    app_files = []
    network = str(service.get("network_mode", ""))
    if network.startswith("service:"):
        app = services[network.partition(":")[2]]
        ports.update(compose_ports(app))
        app_files = [path.read_text() for path in compose_volumes(app).values()]
    return Sidecar(
        name=f"compose/{name}",
        argv=argv,
        environ=environ,
        secret_variables=from_shell,
        config_text=mounts[config_path].read_text(),
        config_source=f"compose.yaml: {name}",
        ports=ports,
        grace_period_s=compose_duration_s(str(service.get("stop_grace_period", "10s"))),
        app_files=app_files,
        service=service,
    )


# Sidecars are listed by name when the tests are collected, and loaded in
# each test, so that a broken file fails the tests that read it instead of
# the collection of the whole module.
KUBERNETES_SIDECARS = sorted(
    f"{workload['metadata']['name']}/{container['name']}"
    for workload in workloads()
    for container in workload["spec"]["template"]["spec"]["containers"]
    if is_sidecar_image(container["image"])
)
COMPOSE_SIDECARS = sorted(
    f"compose/{name}"
    for name, service in compose_services().items()
    if is_sidecar_image(str(service.get("image", "")))
)
SIDECAR_NAMES = KUBERNETES_SIDECARS + COMPOSE_SIDECARS


@cache
def load_sidecar(name: str) -> Sidecar:
    if name.startswith("compose/"):
        return compose_sidecar(name.partition("/")[2])
    workload_name, _, container_name = name.partition("/")
    return kubernetes_sidecar(workload_name, container_name)


def names_with_section(section: str) -> list[str]:
    """Return the sidecars whose config.toml has `section`.

    A sidecar that cannot be loaded is listed too, so that its tests run and
    report the problem.
    """
    names = []
    for name in SIDECAR_NAMES:
        try:
            document = tomllib.loads(load_sidecar(name).config_text)
        # Any error of a broken file. pytest.fail raises outside Exception.
        except (pytest.fail.Exception, Exception):
            names.append(name)
            continue
        if section in document:
            names.append(name)
    return names


def test_every_deployment_has_sidecars() -> None:
    assert len(KUBERNETES_SIDECARS) >= 2
    assert len(COMPOSE_SIDECARS) >= 2


# Checks of every sidecar.


@pytest.mark.parametrize("name", SIDECAR_NAMES)
def test_sidecar_command_runs(name: str) -> None:
    arguments = parse_cli(load_sidecar(name).argv)
    assert arguments.command == "run"


@pytest.mark.parametrize("name", SIDECAR_NAMES)
def test_sidecar_variables_are_config_keys(name: str) -> None:
    sidecar = load_sidecar(name)
    for variable in sidecar.environ:
        if variable.startswith(ENV_PREFIX):
            assert variable in override_names(), f"{variable}: no such config key"


@pytest.mark.parametrize("name", SIDECAR_NAMES)
def test_sidecar_config_is_valid(name: str) -> None:
    sidecar = load_sidecar(name)
    config = sidecar.config()
    assert config.services or config.pod is not None


@pytest.mark.parametrize("name", SIDECAR_NAMES)
def test_sidecar_config_passes_check(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run ``stateful-route check`` itself on the file, in the container's env."""
    sidecar = load_sidecar(name)
    path = tmp_path / "config.toml"
    path.write_text(sidecar.config_text)
    for variable in list(os.environ):
        if variable.startswith(ENV_PREFIX) or variable in ("POD_NAME", "POD_IP"):
            monkeypatch.delenv(variable)
    for variable, value in sidecar.environ.items():
        monkeypatch.setenv(variable, value)
    assert cli_main(["check", "--config", str(path)]) == 0


@pytest.mark.parametrize("name", SIDECAR_NAMES)
def test_sidecar_ports_match_config(name: str) -> None:
    sidecar = load_sidecar(name)
    config = sidecar.config()
    declared = set(sidecar.ports.values())
    assert declared == reachable_ports(config)


@pytest.mark.parametrize("name", SIDECAR_NAMES)
def test_sidecar_admin_token_from_secret(name: str) -> None:
    sidecar = load_sidecar(name)
    config = sidecar.config()
    if is_loopback(config.admin.host):
        return
    # Reachable from other hosts: a token must guard the admin API, and it
    # must come from a Secret or the shell, not from a file in the repository.
    assert config.admin.token, "admin API on a non-loopback address without token"
    assert "token" not in tomllib.loads(sidecar.config_text).get("admin", {})
    assert "STATEFUL_ROUTE_ADMIN_TOKEN" in sidecar.secret_variables


@pytest.mark.parametrize("name", SIDECAR_NAMES)
def test_sidecar_store_host_exists(name: str) -> None:
    sidecar = load_sidecar(name)
    config = sidecar.config()
    assert config.store.backend == "redis"
    url = urlsplit(config.store.redis_url)
    if sidecar.container:
        service = find_object("Service", str(url.hostname))
        ports = [port["port"] for port in service["spec"]["ports"]]
        assert (url.port or 6379) in ports
    else:
        assert url.hostname in compose_services()


# Pod-side sidecars.


def pod_side_names() -> list[str]:
    return names_with_section("pod")


def router_names() -> list[str]:
    return names_with_section("services")


def test_pod_side_sidecars_exist() -> None:
    assert any(name in KUBERNETES_SIDECARS for name in pod_side_names())
    assert any(name in COMPOSE_SIDECARS for name in pod_side_names())


@pytest.mark.parametrize("name", pod_side_names())
def test_grace_period_exceeds_drain(name: str) -> None:
    sidecar = load_sidecar(name)
    config = sidecar.config()
    assert sidecar.grace_period_s > stop_time_s(config), (
        f"grace period {sidecar.grace_period_s:g}s <= drain_s + "
        f"shutdown_timeout_s = {stop_time_s(config):g}s"
    )


@pytest.mark.parametrize("name", pod_side_names())
def test_pod_side_app_address_served(name: str) -> None:
    """A file mounted into the app listens at pod.app_address."""
    sidecar = load_sidecar(name)
    config = sidecar.config()
    assert config.pod is not None
    listened = {
        address
        for text in sidecar.app_files
        for address in re.findall(r"^\s*listen\s+([^;\s]+)\s*;", text, re.MULTILINE)
    }
    assert config.pod.app_address in listened


@pytest.mark.parametrize("name", pod_side_names())
def test_pod_side_advertises_reachable_address(name: str) -> None:
    sidecar = load_sidecar(name)
    config = sidecar.config()
    assert config.pod is not None
    advertised = parse_address(config.pod.advertise_address)
    assert advertised.port == config.pod.port
    assert not is_loopback(config.pod.host)
    if sidecar.container:
        # From the downward API, so that every pod publishes its own IP.
        assert advertised.host == SAMPLE_POD_IP
    else:
        network = str(sidecar.service.get("network_mode", ""))
        assert network == f"service:{advertised.host}"


@pytest.mark.parametrize("name", pod_side_names())
def test_pod_side_index_from_pod_name(name: str) -> None:
    sidecar = load_sidecar(name)
    config = sidecar.config()
    assert config.pod is not None
    assert "index" not in tomllib.loads(sidecar.config_text)["pod"]
    ordinal = sidecar.environ["POD_NAME"].rpartition("-")[2]
    assert config.pod.index == int(ordinal)


def test_pod_side_runs_in_statefulset() -> None:
    for name in pod_side_names():
        sidecar = load_sidecar(name)
        if sidecar.container:
            # Only a StatefulSet gives each pod a stable -<ordinal> name.
            assert sidecar.workload_kind == "StatefulSet", name


@pytest.mark.parametrize(
    "name", [name for name in pod_side_names() if name in KUBERNETES_SIDECARS]
)
def test_app_outlives_sidecar_drain(name: str) -> None:
    """The other containers wait in preStop until the sidecar has stopped."""
    sidecar = load_sidecar(name)
    config = sidecar.config()
    others = [c for c in sidecar.pod_spec["containers"] if c is not sidecar.container]
    assert others
    for container in others:
        pre_stop = container.get("lifecycle", {}).get("preStop", {})
        if "sleep" in pre_stop:
            wait_s = float(pre_stop["sleep"]["seconds"])
        else:
            command = " ".join(pre_stop.get("exec", {}).get("command", []))
            match = re.search(r"\bsleep\s+(\d+)", command)
            assert match, (
                f"{container['name']}: no preStop wait, so it stops at SIGTERM "
                "while the sidecar still drains"
            )
            wait_s = float(match.group(1))
        assert wait_s >= stop_time_s(config), container["name"]
        assert wait_s < sidecar.grace_period_s, container["name"]


@pytest.mark.parametrize(
    "name", [name for name in pod_side_names() if name in COMPOSE_SIDECARS]
)
def test_compose_stops_sidecar_first(name: str) -> None:
    """Compose stops a service before those it depends on."""
    service = load_sidecar(name).service
    network = str(service["network_mode"])
    assert network.startswith("service:")
    assert network.partition(":")[2] in service["depends_on"]


def registry_routes() -> list[tuple[str, str, tuple[str, ...]]]:
    """Return (sidecar, service, namespaces) of every registry-discovered service."""
    routes = []
    for name in router_names():
        try:
            config = load_sidecar(name).config()
        except (pytest.fail.Exception, Exception):
            # test_sidecar_config_is_valid reports the problem.
            continue
        for service in config.services.values():
            if service.uses_registry:
                routes.append((name, service.name, service.namespaces))
    return routes


@pytest.mark.parametrize(
    ("name", "service", "namespaces"),
    registry_routes(),
    ids=[f"{name}-{service}" for name, service, _ in registry_routes()],
)
def test_registry_service_has_publishers(
    name: str, service: str, namespaces: tuple[str, ...]
) -> None:
    """Some pod-side sidecar of the same deployment publishes the service."""
    same_deployment = (
        COMPOSE_SIDECARS if name in COMPOSE_SIDECARS else KUBERNETES_SIDECARS
    )
    publishers = []
    for other in pod_side_names():
        pod = load_sidecar(other).config().pod
        assert pod is not None
        serves_namespace = not namespaces or pod.namespace in namespaces
        if other in same_deployment and pod.service == service and serves_namespace:
            publishers.append(other)
    assert publishers, f"no pod-side sidecar publishes {service!r} in {namespaces}"


# Kubernetes probes and objects.


@pytest.mark.parametrize("name", KUBERNETES_SIDECARS)
@pytest.mark.parametrize(
    ("probe", "path"), [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
)
async def test_probe_reaches_open_admin_endpoint(
    name: str, probe: str, path: str
) -> None:
    sidecar = load_sidecar(name)
    config = sidecar.config()
    http_get = sidecar.container[probe]["httpGet"]
    assert http_get["path"] == path
    port = http_get["port"]
    assert sidecar.ports.get(port, port) == config.admin.port
    # The kubelet connects to the pod IP.
    assert not is_loopback(config.admin.host)

    # The real admin app, with the container's token, must serve the path
    # to a client without a token.
    headers = {
        header["name"]: header["value"] for header in http_get.get("httpHeaders", [])
    }
    server = ProxyServer(config, store=MemoryStore())
    async with TestClient(TestServer(build_admin_app(server))) as client:
        response = await client.get(path, headers=headers)
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("name", KUBERNETES_SIDECARS)
def test_sidecar_security_context(name: str) -> None:
    context = load_sidecar(name).container.get("securityContext", {})
    assert context.get("runAsNonRoot") is True
    assert str(context.get("runAsUser", image_user())) == image_user()
    assert context.get("readOnlyRootFilesystem") is True
    assert context.get("allowPrivilegeEscalation") is False


@pytest.mark.parametrize(
    "name", [name for name in router_names() if name in KUBERNETES_SIDECARS]
)
def test_callers_use_router_port(name: str) -> None:
    """The loopback URLs of the other containers name the router's port."""
    sidecar = load_sidecar(name)
    config = sidecar.config()
    urls = [
        (container["name"], variable["name"], variable.get("value", ""))
        for container in sidecar.pod_spec["containers"]
        if container is not sidecar.container
        for variable in container.get("env", [])
    ]
    ports = [
        (container, variable, int(port))
        for container, variable, value in urls
        for port in re.findall(r"https?://(?:127\.0\.0\.1|localhost):(\d+)", value)
    ]
    assert ports, "no container of the pod sends to the router"
    for container, variable, port in ports:
        assert port == config.proxy.port, f"{container}: {variable}"


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    manifests = {
        path.name
        for path in KUBERNETES.glob("*.yaml")
        if path.name != "kustomization.yaml"
    }
    assert set(kustomization["resources"]) == manifests


def test_workload_selectors_match_labels() -> None:
    for workload in workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]


def test_statefulset_has_headless_service() -> None:
    for statefulset in objects_of_kind("StatefulSet"):
        service = find_object("Service", statefulset["spec"]["serviceName"])
        assert service["spec"].get("clusterIP") == "None"


def test_probe_named_ports_exist() -> None:
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            names = {port.get("name") for port in container.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                action = container.get(probe, {})
                for kind in ("httpGet", "tcpSocket"):
                    port = action.get(kind, {}).get("port")
                    if isinstance(port, str):
                        assert port in names, f"{container['name']}.{probe}: {port}"


def test_services_target_declared_ports() -> None:
    container_ports = {
        port.get("name"): port["containerPort"]
        for workload in workloads()
        for container in workload["spec"]["template"]["spec"]["containers"]
        for port in container.get("ports", [])
    }
    for service in objects_of_kind("Service"):
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in container_ports, service["metadata"]["name"]
            else:
                assert target in container_ports.values()


# Compose.


def test_compose_builds_from_dockerfile() -> None:
    for name, service in compose_services().items():
        if not is_sidecar_image(str(service.get("image", ""))):
            continue
        build = service["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE, name


def test_compose_publishes_on_loopback() -> None:
    for name, service in compose_services().items():
        for entry in service.get("ports", []):
            assert str(entry).startswith("127.0.0.1:"), f"{name}: {entry}"


def test_compose_app_matches_kubernetes() -> None:
    """Both samples run the same nginx server block as the game app."""
    template = (DEPLOY / "compose" / "default.conf.template").read_text()
    configmap = find_object("ConfigMap", "game-app")
    assert configmap["data"]["default.conf.template"] == template


def test_compose_depends_on_defined_services() -> None:
    services = compose_services()
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name}: {dependency}"
        network = str(service.get("network_mode", ""))
        if network.startswith("service:"):
            assert network.partition(":")[2] in services, name
            assert "ports" not in service, f"{name}: ports on a shared network"
