"""Services at run time: their pods per namespace, strategy, measurements, health."""

from __future__ import annotations

from collections.abc import Mapping

from proxy.balancing import Strategy, build_strategy
from proxy.config import ServiceSettings
from proxy.hashing import ConsistentHash
from proxy.health import HealthTable
from proxy.pods import Address, Pod
from proxy.stats import PodStats


class Service:
    """One configured service: settings, strategy, measurements, health and pods.

    The pods of every namespace are computed once from the settings, so a
    request never formats an address. `placement` is the consistent hash
    that routing falls back to while the link store is unavailable. `stats`
    and `health` are kept apart from the strategy, so rebuilding it resets
    neither.

    :param settings: the service's section of the configuration.
    :param stats: the measurements table; a new one when not given.
    """

    def __init__(
        self, settings: ServiceSettings, stats: PodStats | None = None
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.stats = stats if stats is not None else PodStats(settings.ewma_decay_s)
        self.health = HealthTable(settings)
        self.strategy: Strategy = build_strategy(settings, self.stats)
        if isinstance(self.strategy, ConsistentHash):
            self.placement = self.strategy
        else:
            self.placement = ConsistentHash(settings, self.stats)
        self._static: tuple[Pod, ...] | None = None
        self._by_namespace: dict[str, tuple[Pod, ...]] = {}
        self._compute_pods()

    def _compute_pods(self) -> None:
        settings = self.settings
        self._static = None
        by_namespace = {}
        if settings.pods:
            self._static = _numbered(settings.addresses(""))
        # Registry pods come from the state records, so there are no
        # addresses to compute, and `namespaces` only limits what is served.
        if not settings.uses_registry:
            for namespace in settings.namespaces:
                by_namespace[namespace] = _numbered(settings.addresses(namespace))
        self._by_namespace = by_namespace

    def reconfigure(self, settings: ServiceSettings) -> None:
        """Apply new settings of this service, as a reload does.

        The strategy is rebuilt, which loses only its own position, such as
        a rotation counter. The measurements and the health table stay, so
        pods that stay keep their health state, ejections and slow start.
        """
        self.settings = settings
        self.stats.decay_s = settings.ewma_decay_s
        self.health.configure(settings)
        self.strategy = build_strategy(settings, self.stats)
        if isinstance(self.strategy, ConsistentHash):
            self.placement = self.strategy
        else:
            self.placement = ConsistentHash(settings, self.stats)
        self._compute_pods()

    def pods(self, namespace: str) -> tuple[Pod, ...] | None:
        """Return the pods serving `namespace`, or None when it is not served.

        Static pods serve every namespace. A templated service serves only
        the namespaces it lists, because the namespace is part of the host.
        """
        if self._static is not None:
            return self._static
        return self._by_namespace.get(namespace)

    def pod_count(self, namespace: str) -> int:
        pods = self.pods(namespace)
        return 0 if pods is None else len(pods)

    def describe(self) -> str:
        """Return a one-line summary for the start-up log."""
        settings = self.settings
        if settings.uses_registry:
            return f"{self.name} (pods from state records, {settings.strategy})"
        if settings.pods:
            return (
                f"{self.name} ({_pod_count(len(settings.pods))}, {settings.strategy})"
            )
        namespaces = ",".join(settings.namespaces)
        return (
            f"{self.name} ({_pod_count(settings.replicas)} per namespace in "
            f"{namespaces}, {settings.strategy})"
        )


def _pod_count(count: int) -> str:
    return "1 pod" if count == 1 else f"{count} pods"


def _numbered(addresses: tuple[Address, ...] | None) -> tuple[Pod, ...]:
    assert addresses is not None
    return tuple(Pod(index, address) for index, address in enumerate(addresses))


def build_services(settings: Mapping[str, ServiceSettings]) -> dict[str, Service]:
    return {name: Service(service) for name, service in settings.items()}
