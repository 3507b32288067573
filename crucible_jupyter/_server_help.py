"""Put crucible's settings into ``jupyter server --help-all`` and ``--generate-config``.

jupyter_server prints its help (and writes a generated config) from ``ServerApp.classes``, a
static list read while parsing the command line, before any server extension is found. No
extension can appear there through the extension API, so this module does the one thing that
works: when a process asks for help or a generated config and imports
``jupyter_server.serverapp``, the crucible classes (``CrucibleApp``, ``CrucibleDispatcher`` and
every installed backend) are appended to ``ServerApp.classes`` right after that module loads.

It is wired through ``crucible_jupyter_help.pth`` (installed beside the package), whose single
line imports this module only when ``--help-all`` or ``--generate-config`` is on the command
line; every other Python process pays one membership test and nothing else. It promises never to
break the process it runs in: any failure leaves jupyter_server's help as it was.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

TARGET = "jupyter_server.serverapp"
TRIGGERS = ("--help-all", "--generate-config")


def wanted(argv: list[str]) -> bool:
    """True when ``argv`` asks for the full help or a generated config file."""
    return any(arg in TRIGGERS for arg in argv[1:])


def crucible_classes() -> list[type]:
    """The configurable classes crucible adds (the server app decides which:
    :func:`crucible_jupyter.server.app.crucible_classes`)."""
    from .server.app import crucible_classes

    return crucible_classes()


def extend(server_app: Any) -> None:
    """Append the crucible classes to ``server_app.classes`` (idempotent)."""
    try:
        extra = [c for c in crucible_classes() if c not in server_app.classes]
    except Exception as e:  # noqa: BLE001 -- never break `jupyter server --help-all` itself
        print(f"crucible_jupyter: settings not listed here ({e})", file=sys.stderr)
        return
    server_app.classes = [*server_app.classes, *extra]


class _AfterServerAppLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``jupyter_server.serverapp`` so that
    :func:`extend` runs once the module has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            extend(module.ServerApp)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install(argv: list[str] | None = None) -> None:
    """Arrange for :func:`extend` to run when ``jupyter_server.serverapp`` loads, if ``argv``
    (default ``sys.argv``) asks for help or a generated config. Called from the ``.pth`` file."""
    if not wanted(sys.argv if argv is None else argv):
        return
    loaded = sys.modules.get(TARGET)
    if loaded is not None:
        extend(loaded.ServerApp)
    elif not any(isinstance(f, _AfterServerAppLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterServerAppLoads())
