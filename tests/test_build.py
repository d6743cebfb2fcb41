"""Tests of `proxy.stale_compiled_modules`, the start-up check of compiled modules."""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import proxy

SUFFIX = EXTENSION_SUFFIXES[0]


def make_module(package: Path, name: str, *, source_newer: bool) -> None:
    """Write a source file and an extension module file, one newer than the other."""
    source = package / f"{name}.py"
    compiled = package / f"{name}{SUFFIX}"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("")
    compiled.write_bytes(b"")
    older, newer = (compiled, source) if source_newer else (source, compiled)
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))


def test_stale_modules_found_without_import(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    package = tmp_path / "pkg"
    make_module(package, "edited", source_newer=True)
    make_module(package, "built", source_newer=False)
    make_module(package / "store", "nested", source_newer=True)
    (package / "plain.py").write_text("")

    stale = proxy.stale_compiled_modules(package)

    assert stale == ["pkg.edited", "pkg.store.nested"]


def test_installed_package_never_stale(tmp_path: Path) -> None:
    # Without pyproject.toml beside it, the package is installed, where pip
    # writes sources and extensions in no set order.
    package = tmp_path / "pkg"
    make_module(package, "edited", source_newer=True)

    assert proxy.stale_compiled_modules(package) == []
