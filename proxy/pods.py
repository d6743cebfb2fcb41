"""Pods and their addresses."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

# A host name of DNS labels; letters may be uppercase, as resolvers accept them.
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*\.?"
)


@dataclass(frozen=True, slots=True)
class Address:
    """A ``host:port`` where a pod serves traffic."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``host:port`` or ``[ipv6]:port``; raise ValueError when invalid."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError("expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r}") from None
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ValueError("expected host:port")
        if _HOSTNAME_RE.fullmatch(host) is None:
            raise ValueError(f"invalid host {host!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid port {port_text!r}: expected 1 to 65535")
    return Address(host, int(port_text))


@dataclass(frozen=True, slots=True)
class Pod:
    """One pod of a service: its StatefulSet ordinal and its address."""

    index: int
    address: Address
    # Pods key the stats, health and pod-state tables, which several lookups
    # of every request read, so the hash is computed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.index, self.address)))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return f"pod {self.index} ({self.address})"
