"""stateful-route: a sidecar proxy that keeps each user on the pod holding its state."""

from __future__ import annotations

from pathlib import Path

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


def stale_compiled_modules(package_dir: Path | None = None) -> list[str]:
    """Return the compiled modules whose source file changed after they were built.

    Python imports a compiled module in place of its source file, so an
    edit of the source has no effect until the next compiling install.
    Every extension module in the package's directory counts, imported or
    not. `package_dir` is the package's directory, this package's by
    default.
    """
    from importlib.machinery import EXTENSION_SUFFIXES

    package = package_dir or Path(__file__).parent
    # An installed package gets its sources and extensions written in one
    # go, in no set order, so only a source tree can have stale ones.
    if not (package.parent / "pyproject.toml").exists():
        return []
    stale = []
    for compiled in package.rglob("*"):
        suffixes = [end for end in EXTENSION_SUFFIXES if compiled.name.endswith(end)]
        if not suffixes:
            continue
        suffix = suffixes[0]
        source = compiled.with_name(compiled.name[: -len(suffix)] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            parts = source.relative_to(package.parent).with_suffix("").parts
            stale.append(".".join(parts))
    return sorted(stale)
