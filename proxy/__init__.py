"""stateful-route: a sidecar proxy that keeps each user on the pod holding its state."""

from __future__ import annotations

__version__ = "0.1.0"


def build_kind() -> str:
    """Return how the forwarding path was built: ``compiled`` or ``pure Python``.

    An install from a wheel or ``pip install .`` compiles the per-request
    modules with mypyc where it can (see setup.py), and Python then imports
    the extension module in place of the source file.
    """
    from proxy import inbound

    compiled = not (inbound.__file__ or "").endswith(".py")
    return "compiled" if compiled else "pure Python"
