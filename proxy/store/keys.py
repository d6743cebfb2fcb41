"""Redis key layout shared with the Java routers.

One hash tag per (namespace, uid) keeps all keys of a user in one Redis
Cluster slot:

- ``sf:{<ns>:lk:<uid>}`` hash: service -> pod index, persistent links only.
- ``sf:{<ns>:lk:<uid>}<svc>`` string: pod index in decimal; a temporary link
  has a TTL, a persistent one has none.
- ``sf:{<ns>:state:<svc>}`` hash: pod index -> pod state record.
- ``sf:{<ns>:workload:<svc>}`` string: service-wide workload state.

Callers validate the names first (see `proxy.names`); these functions only
format.
"""

from __future__ import annotations


def uid_hash_key(namespace: str, uid: str) -> str:
    """Return the key of the hash of persistent links of one UID."""
    return f"sf:{{{namespace}:lk:{uid}}}"


def link_key(namespace: str, uid: str, service: str) -> str:
    """Return the key of the link of one UID to one service."""
    return f"sf:{{{namespace}:lk:{uid}}}{service}"


def state_key(namespace: str, service: str) -> str:
    """Return the key of the hash of pod state records of one service."""
    return f"sf:{{{namespace}:state:{service}}}"


def workload_key(namespace: str, service: str) -> str:
    """Return the key of the workload state of one service."""
    return f"sf:{{{namespace}:workload:{service}}}"
