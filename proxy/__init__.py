"""stateful-route: a sidecar proxy that keeps each user on the pod holding its state."""

from __future__ import annotations

__version__ = "0.1.0"
