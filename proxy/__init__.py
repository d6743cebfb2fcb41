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


def stale_compiled_modules() -> list[str]:
    """Return the compiled modules whose source file changed after they were built.

    Python imports a compiled module in place of its source file, so an
    edit of the source has no effect until the next compiling install.
    """
    import sys
    from pathlib import Path

    # An installed package gets its sources and extensions written in one
    # go, in no set order, so only a source tree can have stale ones.
    if not (Path(__file__).parent.parent / "pyproject.toml").exists():
        return []
    stale = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.partition(".")[0] != "proxy" or not path or path.endswith(".py"):
            continue
        compiled = Path(path)
        source = compiled.with_name(compiled.name.partition(".")[0] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            stale.append(name)
    return sorted(stale)
