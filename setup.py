"""Build hook that compiles the per-request modules with mypyc.

``STATEFUL_ROUTE_MYPYC`` selects the build:

- unset or ``auto``: compile for a regular install or wheel, but not for an
  editable install, where a compiled module would hide later edits of its
  source file until the next install.
- ``1``: compile, also for an editable install.
- ``0``: build pure Python.

With ``auto``, a failed compilation, such as one without a C compiler,
falls back to pure Python with a warning, so the package installs either
way. With ``1`` it fails the build, because compiled modules were
requested. mypyc's ``-Werror`` is dropped, so a compiler that warns about
the generated C, as a newer one may, still builds it. The compiled
modules import the ``.so`` next to each source file, and Python prefers
the ``.so`` when both exist.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The modules of the forwarding path and the small ones they call per
# request. proxy/errors.py and proxy/balancing.py are left out because
# mypyc 2.4.1 rejects them as they are: errors.py has an exception class
# with a builtin base other than Exception, and balancing.py reads an
# instance attribute through a class.
COMPILED_MODULES = [
    "proxy/cache.py",
    "proxy/client_head.py",
    "proxy/connections.py",
    "proxy/forward.py",
    "proxy/health.py",
    "proxy/inbound.py",
    "proxy/inflight.py",
    "proxy/metrics.py",
    "proxy/names.py",
    "proxy/pods.py",
    "proxy/podset.py",
    "proxy/podstate.py",
    "proxy/relay.py",
    "proxy/request_head.py",
    "proxy/retry.py",
    "proxy/routing.py",
    "proxy/services.py",
    "proxy/statetable.py",
    "proxy/stats.py",
    "proxy/tunnel.py",
    "proxy/upstream.py",
    "proxy/upstream_connection.py",
]
MODE_VARIABLE = "STATEFUL_ROUTE_MYPYC"
_EDITABLE_COMMANDS = {"editable_wheel", "develop"}
_BUILD_COMMANDS = {"bdist_wheel", "build", "build_ext", "install"} | _EDITABLE_COMMANDS


def _mode() -> str:
    mode = os.environ.get(MODE_VARIABLE, "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"invalid {MODE_VARIABLE}={mode!r}: expected auto, 0 or 1")
    return mode


def _warn(message: str) -> None:
    print(f"stateful-route build: {message}", file=sys.stderr)


def _not_compiled(failure: str, exc: BaseException) -> None:
    """Report that the modules stay pure Python, or fail the build with ``1``."""
    if _mode() == "1":
        raise SystemExit(
            f"stateful-route build: {failure} with {MODE_VARIABLE}=1: {exc}. "
            f"Fix the cause, or set {MODE_VARIABLE}=auto to install pure Python"
        ) from exc
    _warn(f"{failure}, so the modules stay pure Python: {exc}")


def _remove_uncompiled_extensions() -> None:
    """Delete the package's in-place extension files of modules no longer compiled.

    An in-place or editable build writes each compiled module's extension
    file beside its source. When a module leaves COMPILED_MODULES, its old
    file stays, and Python imports it in place of the source. That file
    calls an init function of the shared extension that the new build no
    longer has, so every import of the package fails.
    """
    root = os.path.dirname(os.path.abspath(__file__))
    compiled = {os.path.splitext(path)[0] for path in COMPILED_MODULES}
    for directory, _, names in os.walk(os.path.join(root, "proxy")):
        for name in names:
            if not name.endswith((".so", ".pyd")):
                continue
            path = os.path.join(directory, name)
            module = os.path.relpath(os.path.join(directory, name.split(".")[0]), root)
            if module.replace(os.sep, "/") not in compiled:
                os.remove(path)
                _warn(f"removed {path}, which an earlier build compiled")


class OptionalBuildExt(build_ext):
    """Build the mypyc extensions, or none of them when that fails or is off."""

    def run(self) -> None:
        if _mode() == "auto" and self.editable_mode:
            _warn(
                f"editable install, so the modules stay pure Python; "
                f"set {MODE_VARIABLE}=1 to compile them"
            )
            return
        if self.extensions and (self.inplace or self.editable_mode):
            _remove_uncompiled_extensions()
        try:
            super().run()
        except Exception as exc:
            _not_compiled("mypyc build failed", exc)


def _builds_code() -> bool:
    """Tell whether this run of setup.py builds the package, not only its metadata.

    pip runs setup.py once for each build step (``egg_info``, ``dist_info``,
    then ``bdist_wheel`` or ``editable_wheel``), and mypyc's type check and
    C generation take about a minute, so only a build step runs them.
    """
    arguments = set(sys.argv[1:])
    if _mode() == "auto" and arguments & _EDITABLE_COMMANDS:
        return False
    return bool(arguments & _BUILD_COMMANDS)


def _extensions() -> list[Any]:
    if _mode() == "0" or not _builds_code():
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        _not_compiled("mypyc is not installed", exc)
        return []
    try:
        extensions = list(mypycify(COMPILED_MODULES, group_name="stateful_route"))
    except (Exception, SystemExit) as exc:
        # mypycify type-checks first and exits on a mypy error.
        _not_compiled("mypyc rejected the modules", exc)
        return []
    for extension in extensions:
        extension.extra_compile_args = [
            flag for flag in extension.extra_compile_args if flag != "-Werror"
        ]
    return extensions


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
