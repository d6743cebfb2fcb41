"""Redis key layout shared with the Java routers.

One hash tag per (namespace, uid) keeps all keys of a user in one Redis
Cluster slot:

- ``sf:{<ns>:lk:<uid>}`` hash: service -> pod index, persistent links only.
- ``sf:{<ns>:lk:<uid>}<svc>`` string: pod index in decimal; a temporary link
  has a TTL, a persistent one has none.
- ``sf:{<ns>:state:<svc>}`` hash: pod index -> pod state record.
- ``sf:{<ns>:workload:<svc>}`` string: service-wide workload state.
- ``sf:{<ns>:lk:<uid>}<svc>:moved`` string: ``<previous pod>:<reason>`` of a
  user that a background failover moved, read once by the next router that
  reads the link, so the new pod learns of the move through any proxy. This
  project's addition; service names have no ``:``, so it is no link key.
- ``sf:{<ns>:podlinks:<svc>:<pod>}`` sorted set: UIDs linked to one pod,
  scored by the link's expiry in Unix milliseconds (``+inf`` when
  persistent). This index is this project's addition, not part of the Java
  layout; it is a hint kept beside the links (see `pod_links_key`).

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


def pod_links_key(namespace: str, service: str, pod: int) -> str:
    """Return the key of the index of UIDs linked to one pod.

    The index has its own hash tag, so in Redis Cluster it lives apart from
    the links it points to and cannot be written in the same script. It is
    updated after each link change and every reader re-checks the link.
    """
    return f"sf:{{{namespace}:podlinks:{service}:{pod}}}"


def move_notice_key(namespace: str, uid: str, service: str) -> str:
    """Return the key of the notice that a user was moved in the background."""
    return f"sf:{{{namespace}:lk:{uid}}}{service}:moved"
